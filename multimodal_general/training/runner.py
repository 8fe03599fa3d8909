"""One short training loop for the sequence tasks (Food-101, CMU-MOSI, IEMOCAP), reusable
with any :class:`~multimodal_general.datasets.task_data.TaskData` and any balancer.

>>> data = load_task(settings)                       # the task's reader
>>> result = train_seed(settings, data, seed=0, run_dir=Path("runs/mosi/seed-0"))

Protocol: after every epoch the fused model is scored on the ``valid`` split with the field's
metrics; the run keeps the epoch with the best selection metric (``SELECTION``: accuracy up
for the classification tasks, MAE down for CMU-MOSI; first best wins). The ``test`` split is
scored once, on the selected model. Nothing is selected on test.

A run folder (one per seed) holds what the BraTS trainer's does: ``metrics.jsonl`` /
``metrics.csv`` (one row per epoch: training loss, validation metrics, each unimodal head's
validation metric), ``telemetry.csv`` (one row per optimizer step: ``eps``, ``B``, cosines,
encoder gradient norms...), ``tensorboard/``, ``checkpoints/{best,last}.pt``, ``plots/``
(``loss.png``, ``balance.png``, ``validation.png``) and ``test.json`` (written last: the run
is done).

Method wiring as in the comparison harness: ``modality_dropout`` drops features before the
fused head; ``mslr`` adapts its scales from each unimodal head's validation metric after
every epoch (with Adam-type optimizers through per-encoder learning rates, since Adam
normalizes a gradient scale away); ``gblending`` re-estimates its loss weights from the heads'
train/validation losses every ``super_epoch`` epochs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from multimodal_general.balance import Balancer, BalancerSpec, ModalityDropout, Validation
from multimodal_general.balance.spec import FLAT_NAMES, flat_record
from multimodal_general.datasets.metrics import (
    LOWER_IS_BETTER,
    SELECTION,
    TASK_METRICS,
    task_metrics,
)
from multimodal_general.datasets.task_data import SequenceSplit, TaskData, real_steps_first
from multimodal_general.errors import BadDataFile, ConfigurationError
from multimodal_general.io import atomic_write_text, json_safe, load_tagged, save_tagged
from multimodal_general.models.late_fusion import attach_balancer
from multimodal_general.models.sequence import ModelSize, SequenceFusionNet, task_criterion
from multimodal_general.runs.plots import (
    balance_figure,
    column,
    epoch_axis,
    has_data,
    loss_figure,
    new_figure,
    read_metrics,
    read_telemetry,
    save_figure,
)
from multimodal_general.runs.runlog import Logbook
from multimodal_general.training.step import after_validation, balanced_step

TASKS = ("food101", "mosi", "iemocap")
CHECKPOINT_FORMAT = "multimodal-general-checkpoint/1"
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class TrainSettings:
    """Everything a run depends on (saved as the run's ``config.yaml``)."""

    task: str
    data: str
    balancer: BalancerSpec = field(default_factory=BalancerSpec)
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    fusion_head: str = "auto"  # auto: linear for ogm_ge (it needs W [h_1; h_2]), else mlp
    fold: int = 1  # IEMOCAP's cross-validation fold
    max_steps: int = 0  # truncate every sequence to this many steps (0: keep all)
    bert: str = ""  # Food-101: local BERT folder (feature extraction when no cache)
    vit: str = ""  # Food-101: local ViT folder
    device: str = "cpu"

    #: the keys of :meth:`to_dict` in the order run files have always had
    RECORD_ORDER: ClassVar[tuple[str, ...]] = (
        "task", "data", "balancer", "preset", "rho", "lam", "epochs", "batch_size", "lr", "weight_decay",
        "optimizer", "d_model", "layers", "heads", "dropout", "fusion_head", "fold", "max_steps", "bert", "vit",
        "device", "balancer_options")

    def check(self) -> TrainSettings:
        if self.task not in TASKS:
            raise ConfigurationError(f"unknown task {self.task!r}; choose from {list(TASKS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigurationError(f"unknown optimizer {self.optimizer!r}; choose from {list(OPTIMIZERS)}")
        if min(self.epochs, self.batch_size, self.d_model, self.layers, self.heads) < 1 or not self.lr > 0:
            raise ConfigurationError("epochs, batch size, d_model, layers and heads must be >= 1 and lr > 0")
        if self.d_model % self.heads or self.d_model % 2:
            raise ConfigurationError(f"d_model ({self.d_model}) must be even and divisible by heads ({self.heads})")
        if not 0 <= self.dropout < 1 or self.max_steps < 0:
            raise ConfigurationError("dropout must be in [0, 1) and max_steps >= 0")
        return self

    @property
    def size(self) -> ModelSize:
        return ModelSize(self.d_model, self.layers, self.heads, self.dropout)

    @property
    def fusion(self) -> str:
        if self.fusion_head == "auto":
            return "linear" if self.balancer.name == "ogm_ge" else "mlp"
        return self.fusion_head

    def to_dict(self) -> dict[str, Any]:
        """The settings as a run's ``config.yaml`` and checkpoints hold them (the balancer's flat:
        ``balancer``, ``preset``, ``rho``, ``lam``, ``balancer_options``)."""
        return flat_record(self, self.RECORD_ORDER)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str) -> TrainSettings:
        """The settings of :meth:`to_dict`'s record."""
        spec_names = set(FLAT_NAMES.values())
        unknown = sorted(set(values) - {f.name for f in fields(cls)} - spec_names)
        if unknown or "task" not in values or "data" not in values:
            raise BadDataFile(where, f"not a run configuration (unknown keys {unknown})" if unknown
                              else "not a run configuration (no task or data)")
        spec, rest = BalancerSpec.from_flat(values)
        return cls(balancer=spec, **rest).check()


# ---------------------------------------------------------------------------- data
def load_task(settings: TrainSettings, progress: Callable[[int, int], None] | None = None) -> TaskData:
    """The task's data through its reader (one-line errors for a bad path or file)."""
    path = Path(settings.data)
    if not path.exists():
        raise BadDataFile(path, "does not exist")
    max_steps = settings.max_steps or None
    if settings.task == "mosi":
        from multimodal_general.datasets.mosi import read_mosi

        data = read_mosi(path)
        return truncate(data, max_steps) if max_steps else data
    if settings.task == "iemocap":
        from multimodal_general.datasets.iemocap import read_iemocap

        return read_iemocap(path, fold=settings.fold, max_steps=max_steps)
    from multimodal_general.datasets.food101 import load_food101

    data = load_food101(path, bert=settings.bert or None, vit=settings.vit or None, progress=progress)
    return truncate(data, max_steps) if max_steps else data


def truncate(data: TaskData, max_steps: int) -> TaskData:
    """Every sequence cut to its first ``max_steps`` real steps (padding moved to the end first)."""
    splits = {}
    for name, s in data.splits.items():
        cut = {m: real_steps_first(s.inputs[m], s.masks[m]) for m in s.inputs}
        splits[name] = SequenceSplit({m: x[:, :max_steps] for m, (x, _) in cut.items()},
                                     {m: k[:, :max_steps] for m, (_, k) in cut.items()}, s.target, s.ids)
    return replace(data, splits=splits, details={**data.details, "max_steps": max_steps})


# ---------------------------------------------------------------------------- model
@dataclass
class Parts:
    model: SequenceFusionNet
    balancer: Balancer
    criterion: torch.nn.Module
    optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer]


def build(settings: TrainSettings, data: TaskData, seed: int) -> Parts:
    """Model, balancer and optimizers, initialised from ``seed``. A balancer that cannot serve
    the task (e.g. OGM-GE on regression) raises :class:`ConfigurationError`."""
    torch.manual_seed(seed)
    model = SequenceFusionNet(data.input_dims, data.out_dim, settings.size, settings.fusion)
    criterion = task_criterion(data.kind)
    per_encoder_lr = settings.balancer.name == "mslr" and settings.optimizer == "adamw"  # see the module docstring
    balancer = attach_balancer(model, settings.balancer, criterion, data.kind,
                               **({"applied_by_optimizer": True} if per_encoder_lr else {}))
    device = torch.device(settings.device)
    model.to(device), balancer.to(device)
    encoder_params = {id(p) for e in model.encoders.values() for p in e.parameters()}
    groups = [{"params": list(e.parameters()), "modality": name,
               "lr": settings.lr * (balancer.scale_of(name) if per_encoder_lr else 1.0)}
              for name, e in model.encoders.items()]
    groups.append({"params": [p for p in model.parameters() if id(p) not in encoder_params]})
    if settings.optimizer == "adamw":
        make = lambda params: torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)  # noqa: E731
    else:
        make = lambda params: torch.optim.SGD(params, lr=settings.lr, momentum=0.9,  # noqa: E731
                                              weight_decay=settings.weight_decay)
    return Parts(model, balancer, criterion, (make(groups), make(balancer.parameters())))


def _forward(parts: Parts) -> Callable:
    balancer, model = parts.balancer, parts.model
    if isinstance(balancer, ModalityDropout) and not balancer.applied_by_model:
        return lambda batch: model(batch, feature_dropout=balancer.drop_features)
    return model


@torch.no_grad()
def predict(parts: Parts, split: SequenceSplit, batch_size: int = 256) -> tuple[Tensor, dict[str, Tensor]]:
    """The fused output and each unimodal head's output on a whole split (eval mode, CPU)."""
    parts.model.eval()
    parts.balancer.eval()
    device = next(parts.model.parameters()).device
    fused, heads = [], {m: [] for m in parts.balancer.heads}
    for batch, _ in split.batches(batch_size):
        output, features = parts.model(batch.to(device))
        fused.append(output.float().cpu())
        for m, head in parts.balancer.heads.items():
            heads[m].append(head(features[m]).float().cpu())
    return torch.cat(fused), {m: torch.cat(v) for m, v in heads.items()}


def score(parts: Parts, data: TaskData, split: str) -> dict[str, Any]:
    """Field metrics of the fused model and of every unimodal head on ``split``."""
    target = data.splits[split].target
    fused, heads = predict(parts, data.splits[split])
    return {
        "fused": _metrics(data.kind, fused, target),
        "heads": {m: _metrics(data.kind, out, target) for m, out in heads.items()},
    }


def _metrics(kind: str, output: Tensor, target: Tensor) -> dict[str, float]:
    if not torch.isfinite(output).all():
        return {"finite": 0.0}
    return task_metrics(kind, output, target)


def _losses(parts: Parts, split: SequenceSplit) -> dict[str, float]:
    fused, heads = predict(parts, split)
    return {k: float(parts.criterion(v, split.target)) for k, v in {"fused": fused, **heads}.items()}


# ---------------------------------------------------------------------------- training
def train_seed(
    settings: TrainSettings,
    data: TaskData,
    seed: int,
    run_dir: Path,
    resume: bool = False,
    on_epoch: Callable[[int, dict], None] | None = None,
    on_batch: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train one seed in ``run_dir`` (or continue it from ``last.pt`` with ``resume``), select
    on validation, score the selected model on test; returns (and writes) ``test.json``."""
    run_dir = Path(run_dir)
    done = run_dir / "test.json"
    last = run_dir / "checkpoints" / "last.pt"
    if resume and done.exists():
        if read_checkpoint(last)["epoch"] >= settings.epochs:
            return json.loads(done.read_text())
        done.unlink()  # --epochs extends a finished run: it trains on, then is scored again
    parts = build(settings, data, seed)
    metric, larger = SELECTION[data.task]
    state = {"epoch": 0, "step": 0, "best": None, "best_epoch": None}
    order = torch.Generator().manual_seed(seed)
    if resume and last.exists():
        state = _restore(last, parts, order, settings)
    elif last.exists():
        raise ConfigurationError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    logbook = Logbook(run_dir, resume_step=state["step"] if resume else None,
                      resume_epoch=state["epoch"] if resume else None)
    if state["epoch"] == 0:  # G-Blending's first measurement: the untrained network
        after_validation(parts.balancer, _validation(parts, data, None, 0), parts.optimizers[0], settings.lr)
    try:
        for epoch in range(state["epoch"], settings.epochs):
            began = time.perf_counter()
            losses = _train_epoch(parts, data.splits["train"], order, settings, logbook, state, epoch + 1, on_batch)
            valid = score(parts, data, "valid")
            after_validation(parts.balancer, _validation(parts, data, valid, epoch + 1), parts.optimizers[0], settings.lr)
            value = valid["fused"].get(metric, math.nan)
            if math.isfinite(value) and (state["best"] is None or (value > state["best"] if larger else value < state["best"])):
                state.update(best=value, best_epoch=epoch + 1)
                _save(run_dir / "checkpoints" / "best.pt", parts, order, settings, seed, state, epoch + 1)
            row = {"epoch": epoch + 1, "step": state["step"], "train_loss": _mean(losses),
                   "seconds": time.perf_counter() - began}
            row.update({f"val_{k}": v for k, v in valid["fused"].items()})
            row.update({f"head_metric/{m}": v.get(metric, math.nan) for m, v in valid["heads"].items()})
            logbook.epoch(row)
            state["epoch"] = epoch + 1
            _save(last, parts, order, settings, seed, state, epoch + 1)
            if on_epoch is not None:
                on_epoch(epoch + 1, row)
    finally:
        logbook.close()
    plot_run(run_dir, data.task)
    result = _selected_result(parts, data, settings, seed, run_dir, state)
    atomic_write_text(done, json.dumps(json_safe(result), indent=2) + "\n")
    return result


def _train_epoch(parts: Parts, train: SequenceSplit, order: torch.Generator, settings: TrainSettings,
                 logbook: Logbook, state: dict, epoch: int, on_batch: Callable[[], None] | None) -> list[float]:
    """One pass over ``train`` in batches drawn by ``order``, each a balanced step logged in
    ``logbook`` (``state["step"]`` counts them); returns the batches' losses."""
    parts.model.train()
    parts.balancer.train()
    forward, device, losses = _forward(parts), torch.device(settings.device), []
    permutation = torch.randperm(len(train), generator=order)
    for start in range(0, len(train), settings.batch_size):
        index = permutation[start : start + settings.batch_size]
        if len(index) < 2 and len(train) > 1:
            continue  # a batch of one breaks nothing but makes accuracies meaningless
        batch, target = train.batch(index)
        loss, telemetry = balanced_step(forward, parts.balancer, parts.optimizers, parts.criterion,
                                        batch.to(device), target.to(device))
        losses.append(float(loss))
        logbook.step({"epoch": epoch, "loss": losses[-1], **telemetry.as_dict(), "step": state["step"]})
        state["step"] += 1
        if on_batch is not None:
            on_batch()
    return losses


def _selected_result(parts: Parts, data: TaskData, settings: TrainSettings, seed: int, run_dir: Path,
                     state: dict) -> dict[str, Any]:
    """The seed's ``test.json``: the validation-selected epoch (``best.pt``, loaded into
    ``parts``) scored on valid and test; no scores when no epoch had a finite metric."""
    metric, larger = SELECTION[data.task]
    diverged = state["best_epoch"] is None  # no epoch had a finite validation metric: nothing to select
    if not diverged:
        _load_weights(run_dir / "checkpoints" / "best.pt", parts)
    empty = {"fused": {}, "heads": {}}
    return {
        "task": data.task, "seed": seed, "method": settings.balancer.method,
        "selected_by": f"valid {metric} ({'max' if larger else 'min'})", "selected_epoch": state["best_epoch"],
        "diverged": diverged,
        "valid": empty if diverged else score(parts, data, "valid"),
        "test": empty if diverged else score(parts, data, "test"),
        "train_seconds": sum(row.get("seconds", 0.0) for row in read_metrics(run_dir)),
        "steps": state["step"],
    }


def _validation(parts: Parts, data: TaskData, valid: dict | None, epoch: int) -> Validation:
    """What MSLR and G-Blending adapt from (see the module docstring): each unimodal head's
    selection metric on ``valid`` (negated when lower is better), and each head's loss on the
    whole train and valid splits (measured only when read)."""
    metric, _ = SELECTION[data.task]
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0

    def head_metrics() -> dict[str, float]:
        return {m: sign * v.get(metric, math.nan) for m, v in valid["heads"].items()}

    def losses() -> dict[str, tuple[float, float]]:
        train, val = _losses(parts, data.splits["train"]), _losses(parts, data.splits["valid"])
        return {k: (train[k], val[k]) for k in train}

    return Validation(epoch, head_metrics if valid is not None else None, losses)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


# ---------------------------------------------------------------------------- checkpoints
def _save(path: Path, parts: Parts, order: torch.Generator, settings: TrainSettings, seed: int,
          state: dict, epoch: int) -> None:
    save_tagged(path, CHECKPOINT_FORMAT, {
        "settings": settings.to_dict(), "seed": seed, "epoch": epoch,
        "state": dict(state), "model": parts.model.state_dict(), "balancer": parts.balancer.state_dict(),
        "optimizers": [o.state_dict() for o in parts.optimizers], "order": order.get_state(),
    })


def read_checkpoint(path: Path) -> dict[str, Any]:
    return load_tagged(path, CHECKPOINT_FORMAT)


def _load_weights(path: Path, parts: Parts) -> dict[str, Any]:
    payload = read_checkpoint(path)
    parts.model.load_state_dict(payload["model"])
    parts.balancer.load_state_dict(payload["balancer"])
    return payload


def _restore(path: Path, parts: Parts, order: torch.Generator, settings: TrainSettings) -> dict:
    payload = _load_weights(path, parts)
    saved = {k: v for k, v in payload["settings"].items() if k != "epochs"}
    if saved != {k: v for k, v in settings.to_dict().items() if k != "epochs"}:
        raise ConfigurationError(f"{path} was written with other settings; --resume continues a run as configured")
    for optimizer, state in zip(parts.optimizers, payload["optimizers"]):
        optimizer.load_state_dict(state)
    order.set_state(payload["order"])
    return dict(payload["state"])


# ---------------------------------------------------------------------------- plots
def plot_run(run_dir: Path, task: str) -> list[Path]:
    """``loss.png``, ``balance.png`` (heads' training-batch metric, ``B``, cosines) and
    ``validation.png`` (the field's metrics per epoch) in ``run_dir/plots``."""
    run_dir = Path(run_dir)
    name = f"{task} {run_dir.parent.name}/{run_dir.name}"
    metrics, telemetry = read_metrics(run_dir), read_telemetry(run_dir)
    selection, _ = SELECTION[task]
    eps = "accuracy" if task != "mosi" else "negative MAE"
    figures = {
        "loss.png": loss_figure(name, telemetry, metrics, "training loss"),
        "balance.png": balance_figure(name, telemetry, metrics, head_metric=eps, head_key="head_metric/"),
        "validation.png": _validation_figure(name, task, metrics),
    }
    return [save_figure(fig, run_dir / "plots" / file) for file, fig in figures.items() if fig]


def _validation_figure(name: str, task: str, metrics: list[dict]):
    keys = [k for k in TASK_METRICS[task] if has_data(column(metrics, f"val_{k}"))]
    if not keys:
        return None
    heads = {k[len("head_metric/"):]: column(metrics, k) for k in dict.fromkeys(k for r in metrics for k in r)
             if k.startswith("head_metric/")}
    selection, _ = SELECTION[task]
    fig, axes = new_figure(2, f"{name}: validation")
    x = epoch_axis(metrics)
    scale = [k for k in keys if k not in ("mae",)]
    for k in scale:
        axes[0].plot(x, column(metrics, f"val_{k}"), marker="o", ms=3, label=k)
    if "mae" in keys:
        axes[0].plot(x, column(metrics, "val_mae"), marker="s", ms=3, color="black", ls="--", label="mae")
    best = "lowest" if selection in LOWER_IS_BETTER else "highest"
    axes[0].set_title(f"fused model (the run keeps the epoch with the {best} validation {selection})", fontsize=10)
    axes[0].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    for m, values in heads.items():
        axes[1].plot(x, values, marker="o", ms=3, label=m)
    axes[1].set_title(f"each modality's unimodal head alone (validation {selection})", fontsize=10)
    if heads:
        axes[1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    axes[-1].set_xlabel("epoch")
    return fig
