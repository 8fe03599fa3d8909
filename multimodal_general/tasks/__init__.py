"""Tasks built on the balancer core: a controlled synthetic imbalance task (``imbalance``) and
UPMC-Food 101, CMU-MOSI and IEMOCAP (``food101``, ``mosi``, ``iemocap``: readers of the official
formats and synthetic writers; ``sequence_model``, ``runner``, ``experiment``, ``comparison``:
the model, the training loop, multi-seed runs and the comparison harness)."""
