"""Training: the balanced step every loop shares (``step``) and the loops of the sequence tasks
(``runner``) and of the imbalance task (``imbalance``). What a run records is in
:mod:`multimodal_general.runs`."""
