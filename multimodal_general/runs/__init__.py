"""What a run records and where it came from: the per-epoch metrics and per-step telemetry it
writes (``runlog``), the figures drawn from them (``plots``), the smoothing of curves and the
mean ± std over seeds (``series``), the command, revision, machine and versions behind a result
(``provenance``), and process-wide CPU settings and memory readings of a run (``runtime``).

Nothing here imports torch at import time; ``plots`` imports matplotlib."""
