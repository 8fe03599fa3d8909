"""The pieces of a balanced training loop, shared by every task."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from multimodal_general.balance import Balancer, StepTelemetry


def balanced_step(
    model: nn.Module,
    balancer: Balancer,
    optimizers: tuple[torch.optim.Optimizer, ...],
    criterion: Callable[[Tensor, Tensor], Tensor],
    inputs: Mapping[str, Tensor],
    target: Tensor,
) -> tuple[Tensor, StepTelemetry]:
    """One optimizer step: forward, task loss + balancer terms, backward, modulation, step.

    ``model(inputs)`` returns ``(output, features)``. ``optimizers`` holds the model's
    optimizer and the heads' optimizer. Returns the detached task loss and the telemetry.
    """
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    output, features = model(inputs)
    task_loss = criterion(output, target)
    (task_loss + balancer.extra_loss(features, output, target, task_loss)).backward()
    telemetry = balancer.modulate()
    for optimizer in optimizers:
        optimizer.step()
    return task_loss.detach(), telemetry
