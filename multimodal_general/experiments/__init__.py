"""Experiments built on training runs: several seeds of one configuration (``seeds``), the
comparison harnesses (``imbalance_comparison``, ``task_comparison``) and where a result came
from (``provenance``)."""
