"""Joint training: the "none" balancer.

Encoder gradients are left as they are. Heads, if registered, are still trained on
detached features and their utilization reported, so that runs without balancing show
the same per-modality telemetry as balanced ones.
"""

from multimodal_general.balance.base import Balancer


class JointTraining(Balancer):
    """Joint training: gradients untouched; registered heads are trained and reported."""

    name = "none"
