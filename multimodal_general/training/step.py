"""The pieces of a balanced training loop, shared by every task: one optimizer step
(:func:`balanced_step`) and what follows a validation (:func:`after_validation`).

The sequence tasks (:mod:`multimodal_general.training.runner`), the synthetic imbalance task
(:mod:`multimodal_general.training.imbalance`) and the BraTS trainer
(``brats_cggm.training.trainer.train_step``, with AMP, a loss check before backward and its
schedule) all step through :func:`balanced_step` and call :func:`after_validation` once
after each validation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn

from multimodal_general.balance import Balancer, StepTelemetry, Validation


def balanced_step(
    model: nn.Module | Callable,
    balancer: Balancer | None,
    optimizers: tuple[torch.optim.Optimizer, ...],
    criterion: Callable[[Tensor, Tensor], Tensor],
    inputs: Mapping[str, Tensor] | Tensor,
    target: Tensor,
    *,
    scaler: torch.amp.GradScaler | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    check_loss: Callable[[Tensor], None] | None = None,
    base_lr: float | None = None,
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None,
) -> tuple[Tensor, StepTelemetry | None]:
    """One optimizer step: forward, task loss + balancer terms, backward, modulation, step.

    ``model(inputs)`` returns ``(output, features)``. ``optimizers`` holds the model's
    optimizer and, if the heads have their own, the heads' optimizer. Returns the detached
    task loss (of the whole batch) and the balancer's telemetry (``None`` without a balancer).

    Options for the loops that need them (each is a no-op at its default):

    * ``scaler``: a ``GradScaler`` (AMP with float16): the loss is scaled for backward and
      the gradients unscaled before ``modulate``, so the balancer sees true gradients;
    * ``autocast``: a context (e.g. ``torch.autocast``) for the forward pass and the losses;
    * ``check_loss``: sees each (micro-)batch's total loss before backward (e.g. to stop on NaN);
    * ``base_lr`` (with the ``scheduler``, if any): after ``modulate``, before the optimizer
      steps, the first optimizer's encoder groups get the balancer's per-step
      :meth:`~multimodal_general.balance.base.Balancer.lr_scales` (:func:`apply_encoder_rates`;
      CGGM with ``scale_by="learning_rate"``);
    * gradient accumulation: with ``balancer.accumulation_steps = k > 1`` the batch is split
      into ``k`` micro-batches along dimension 0, each loss divided by ``k``; ``modulate``
      and the optimizers run once, on the accumulated gradients.
    """
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    steps = balancer.accumulation_steps if balancer is not None else 1
    task_losses = []
    for micro_inputs, micro_target in _micro_batches(inputs, target, steps):
        with autocast():
            output, features = model(micro_inputs)
            task_loss = criterion(output, micro_target)
            loss = task_loss
            if balancer is not None:
                loss = loss + balancer.extra_loss(features, output, micro_target, task_loss)
        if check_loss is not None:
            check_loss(loss)
        if steps > 1:
            loss = loss / steps
        (scaler.scale(loss) if scaler is not None else loss).backward()
        task_losses.append(task_loss.detach())
    if scaler is not None:
        for optimizer in optimizers:
            scaler.unscale_(optimizer)
    telemetry = balancer.modulate() if balancer is not None else None
    if balancer is not None and base_lr is not None:
        apply_encoder_rates(optimizers[0], balancer.lr_scales(), base_lr, scheduler)
    for optimizer in optimizers:
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
    if scaler is not None:
        scaler.update()
    task_loss = task_losses[0] if steps == 1 else torch.stack(task_losses).mean()
    return task_loss, telemetry


def _micro_batches(inputs, target: Tensor, steps: int):
    if steps == 1:
        return [(inputs, target)]
    targets = torch.tensor_split(target, steps)
    if isinstance(inputs, Tensor):
        return list(zip(torch.tensor_split(inputs, steps), targets))
    parts = {name: torch.tensor_split(value, steps) for name, value in inputs.items()}
    return [({name: chunks[i] for name, chunks in parts.items()}, targets[i]) for i in range(steps)]


def after_validation(
    balancer: Balancer | None,
    validation: Validation,
    optimizer: torch.optim.Optimizer,
    base_lr: float,
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None,
) -> dict[str, float] | None:
    """What a loop does after each validation, for any balancer: ``on_validation`` (MSLR
    adapts its scales, G-Blending its loss weights), then the encoders' learning rates from
    ``lr_scales`` (:func:`apply_encoder_rates`). Returns what the balancer reported."""
    if balancer is None:
        return None
    report = balancer.on_validation(validation)
    apply_encoder_rates(optimizer, balancer.lr_scales(), base_lr, scheduler)
    return report


def apply_encoder_rates(
    optimizer: torch.optim.Optimizer,
    scales: Mapping[str, float] | None,
    base_lr: float,
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None,
) -> None:
    """Each param group tagged ``"modality"`` gets the rate ``scales[modality] * base_lr``;
    under a ``LambdaLR`` schedule that is the group's base rate, times the schedule's current
    factor (so the schedule goes on from the new rate). Nothing when ``scales`` is ``None``."""
    if scales is None:
        return
    for index, group in enumerate(optimizer.param_groups):
        if "modality" not in group:
            continue
        rate = base_lr * scales[group["modality"]]
        if scheduler is None:
            group["lr"] = rate
        else:
            scheduler.base_lrs[index] = rate
            group["lr"] = scheduler.base_lrs[index] * scheduler.lr_lambdas[index](scheduler.last_epoch)
