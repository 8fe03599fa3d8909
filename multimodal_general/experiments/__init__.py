"""Experiments built on training runs: several seeds of one configuration (``seeds``) and the
comparison harnesses (``imbalance_comparison``, ``task_comparison``)."""
