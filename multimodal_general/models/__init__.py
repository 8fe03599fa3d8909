"""The networks of the general tasks: late fusion with one encoder per modality (``late_fusion``),
the transformer model of the sequence tasks (``sequence``) and linear probes on frozen
features (``probe``)."""
