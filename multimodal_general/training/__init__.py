"""Training: the balanced step every loop shares (``step``), the loops of the sequence tasks
(``runner``) and of the imbalance task (``imbalance``), what a run records (``runlog``) and
draws (``plots``), and process-wide CPU settings (``runtime``)."""
