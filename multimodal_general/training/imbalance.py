"""Training and scoring on the synthetic imbalance task (:mod:`multimodal_general.datasets.imbalance`):
one run = a task, a balancer, a budget and a seed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from multimodal_general.balance import Balancer, BalancerSpec, ModalityDropout
from multimodal_general.balance.spec import flat_record
from multimodal_general.datasets.imbalance import TASKS, ImbalanceTask, Split, generate
from multimodal_general.models.late_fusion import (  # FUSION_HEADS, unimodal_head: re-exported
    FUSION_HEADS,
    LateFusionNet,
    attach_balancer,
    unimodal_head,
)
from multimodal_general.models.probe import probe_accuracy, probe_mae
from multimodal_general.training.step import after_validation, balanced_step

__all__ = ["FUSION_HEADS", "TASKS", "LateFusionNet", "RunConfig", "build", "generate", "train_and_evaluate",
           "unimodal_head"]


# ---------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class RunConfig:
    task: str = "cls2"
    balancer: BalancerSpec = field(default_factory=BalancerSpec)
    seed: int = 0
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05
    train_size: int = 4000
    val_size: int = 4000
    fusion_head: str = "auto"  # "auto" (linear for ogm_ge, else mlp), "mlp" or "linear" (see build)

    #: the keys of :meth:`to_dict` in the order results files have always had
    RECORD_ORDER: ClassVar[tuple[str, ...]] = (
        "task", "balancer", "preset", "seed", "epochs", "batch_size", "lr", "rho", "lam", "train_size",
        "val_size", "fusion_head", "balancer_options")

    def to_dict(self) -> dict:
        """The run's settings as results files record them (the balancer's flat: ``balancer``,
        ``preset``, ``rho``, ``lam``, ``balancer_options``)."""
        return flat_record(self, self.RECORD_ORDER)


def build(config: RunConfig) -> tuple[LateFusionNet, Balancer, nn.Module]:
    """The model, its balancer (with one head per modality) and the task loss.

    The fused head is ``config.fusion_head``; with ``"auto"`` (the default) ``ogm_ge`` gets
    the single linear fused layer it needs (``"linear"``, chosen automatically) and every
    other balancer today's two-layer head (``"mlp"``). Its runs therefore use a smaller
    fused head than the others; pass ``fusion_head="linear"`` to every method for a
    same-architecture comparison. ``ogm_ge`` with an explicit ``"mlp"`` is refused by
    OGM-GE at the first step (its fused layer must read the concatenated features).
    """
    task = TASKS[config.task]
    model = LateFusionNet(
        {s.name: task.input_dim for s in task.modalities}, task.out_dim,
        fusion_head=fusion_head_of(config),
    )
    criterion = nn.CrossEntropyLoss() if task.kind == "classification" else nn.MSELoss()
    balancer = attach_balancer(model, config.balancer, criterion, task.kind)
    return model, balancer, criterion


def fusion_head_of(config: RunConfig) -> str:
    """The fused head a run gets: ``auto`` -> ``linear`` for ``ogm_ge``, else ``mlp``."""
    if config.fusion_head == "auto":
        return "linear" if config.balancer.name == "ogm_ge" else "mlp"
    return config.fusion_head


def train_model(config: RunConfig, train: Split, progress=None, on_epoch=None, validation=None):
    """Build and train under ``config`` on ``train``; returns ``(model, balancer, telemetry,
    step_seconds)``. ``on_epoch(epoch, model, balancer)`` runs after every epoch (e.g. a
    validation for model selection). ``validation(epoch, model, balancer)`` returns the
    :class:`~multimodal_general.balance.Validation` the balancer adapts from
    (:func:`~multimodal_general.training.step.after_validation`): once before the first epoch
    (epoch 0: the untrained network) and after every epoch, after ``on_epoch``. Neither may
    use the global torch RNG.

    With a :class:`ModalityDropout` balancer the loop passes the features through
    ``balancer.drop_features`` before the fused head (training steps only)."""
    torch.manual_seed(config.seed)
    model, balancer, criterion = build(config)
    optimizers = (
        torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=1e-4),
        torch.optim.SGD(balancer.parameters(), lr=config.lr, momentum=0.9, weight_decay=1e-4),
    )
    if isinstance(balancer, ModalityDropout) and not balancer.applied_by_model:
        def forward(inputs):
            return model(inputs, feature_dropout=balancer.drop_features)
    else:
        forward = model
    order = torch.Generator().manual_seed(config.seed)
    telemetry, step_seconds = [], 0.0
    if validation is not None:
        after_validation(balancer, validation(0, model, balancer), optimizers[0], config.lr)
    for epoch in range(config.epochs):
        model.train()
        permutation = torch.randperm(len(train), generator=order)
        for start in range(0, len(train) - config.batch_size + 1, config.batch_size):
            inputs, target = train.batch(permutation[start : start + config.batch_size])
            began = time.perf_counter()
            _, step = balanced_step(forward, balancer, optimizers, criterion, inputs, target)
            step_seconds += time.perf_counter() - began
            telemetry.append(step)
        if on_epoch is not None:
            on_epoch(epoch, model, balancer)
        if validation is not None:
            after_validation(balancer, validation(epoch + 1, model, balancer), optimizers[0], config.lr)
        if progress is not None:
            progress()
    return model, balancer, telemetry, step_seconds


def train_and_evaluate(config: RunConfig, progress=None) -> dict:
    """Train under ``config`` and report fused and per-modality probe metrics on a held-out
    validation split (no test split is drawn: nothing here selects a model),
    the mean step time, and the balancer's telemetry (one row per step)."""
    task = TASKS[config.task]
    torch.manual_seed(config.seed)
    train = generate(task, config.train_size, seed=2 * config.seed)
    val = generate(task, config.val_size, seed=2 * config.seed + 1)
    model, balancer, telemetry, step_seconds = train_model(config, train, progress=progress)
    return {
        "config": config.to_dict(),
        "method": config.balancer.method,
        "step_ms": 1000 * step_seconds / max(len(telemetry), 1),
        **evaluate(model, task, train, val),
        "telemetry": [row.as_dict() for row in telemetry],
    }


@torch.no_grad()
def evaluate(model: LateFusionNet, task: ImbalanceTask, train: Split, val: Split) -> dict:
    """The fused metric on the held-out validation split, and a linear probe per modality on
    frozen encoder features (fit on train, scored on validation). A model or feature that
    went non-finite scores NaN, never the accuracy of a constant prediction."""
    model.eval()
    output, val_features = model(val.inputs)
    _, train_features = model(train.inputs)
    finite = bool(torch.isfinite(output).all())
    result: dict = {"probe": {}}
    if task.kind == "classification":
        result["fused_acc"] = float((output.argmax(1) == val.target).float().mean()) if finite else math.nan
    else:
        result["fused_mae"] = float((output - val.target).abs().mean())
    for name in train_features:
        train_x, val_x = train_features[name], val_features[name]
        if not (torch.isfinite(train_x).all() and torch.isfinite(val_x).all()):
            result["probe"][name] = math.nan
            continue
        with torch.enable_grad():
            if task.kind == "classification":
                result["probe"][name] = probe_accuracy(train_x, train.target, val_x, val.target, task.classes)
            else:
                result["probe"][name] = probe_mae(train_x, train.target, val_x, val.target)
    return result
