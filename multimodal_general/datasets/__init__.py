"""The data the general tasks learn from: readers of the official formats and synthetic writers.

``task_data`` is the in-memory form every reader produces; ``food101``, ``mosi`` and
``iemocap`` read (and write synthetic copies of) UPMC-Food 101, CMU-MOSI and IEMOCAP;
``synthetic`` is the controllable evidence behind every synthetic copy; ``imbalance`` is the
controlled synthetic task with one dominant modality; ``metrics`` are the metrics each
task's papers report.
"""
