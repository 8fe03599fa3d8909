"""Tasks built on the balancer core: a controlled synthetic imbalance task (more to come:
Food-101, CMU-MOSI, IEMOCAP)."""
