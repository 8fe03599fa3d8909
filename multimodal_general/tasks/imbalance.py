"""A controlled synthetic multimodal task with one dominant, easy modality.

Each modality observes the target through its own latent vector ``v_m``:

* ``easy``: ``x = A v`` with little noise -- linearly readable, learned in a few steps;
* ``slow``: ``x = Q [s, s * v]`` with a random sign vector ``s`` and a random rotation
  ``Q`` -- informative, but ``E[x | target] = 0``: an encoder must learn products before
  it sees anything, so it lags behind;
* ``weak`` (three-modality variant): linearly readable like ``easy`` but noisier.

Classification: every modality's latent is ``P_m[y] + sigma_m * noise`` with its own class
prototypes ``P_m``, so the modalities carry independent evidence and the best fused
prediction needs all of them. Regression: ``y = sum_m u_m . v_m`` over independent
Gaussian latents, so each modality explains a share of the target's variance.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from multimodal_general.balance import Balancer, ModalityDropout
from multimodal_general.loop import balanced_step
from multimodal_general.probe import probe_accuracy, probe_mae
from multimodal_general.tasks.fusion import (  # FUSION_HEADS, unimodal_head: re-exported
    FUSION_HEADS,
    LateFusion,
    attach_balancer,
    mlp,
    unimodal_head,
)

__all__ = ["FUSION_HEADS", "TASKS", "LateFusionNet", "RunConfig", "build", "generate", "train_and_evaluate",
           "unimodal_head"]


@dataclass(frozen=True)
class ModalitySpec:
    name: str
    encoding: str  # "linear" or "product"
    noise: float  # std of the class evidence (classification) or of the input (both)


@dataclass(frozen=True)
class ImbalanceTask:
    name: str
    kind: str  # "classification" or "regression"
    modalities: tuple[ModalitySpec, ...]
    classes: int = 8
    latent_dim: int = 8
    input_dim: int = 32

    @property
    def out_dim(self) -> int:
        return self.classes if self.kind == "classification" else 1


TASKS: dict[str, ImbalanceTask] = {
    task.name: task
    for task in (
        ImbalanceTask(
            "cls2", "classification",
            (ModalitySpec("easy", "linear", 1.2), ModalitySpec("slow", "product", 0.9)),
        ),
        ImbalanceTask(
            "cls3", "classification",
            (
                ModalitySpec("easy", "linear", 1.2),
                ModalitySpec("slow", "product", 0.9),
                ModalitySpec("weak", "linear", 1.8),
            ),
        ),
        ImbalanceTask(
            "reg2", "regression",
            (ModalitySpec("easy", "linear", 0.3), ModalitySpec("slow", "product", 0.3)),
        ),
    )
}


@dataclass
class Split:
    inputs: dict[str, Tensor]
    target: Tensor

    def __len__(self) -> int:
        return len(self.target)

    def batch(self, index: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        return {k: v[index] for k, v in self.inputs.items()}, self.target[index]


def generate(task: ImbalanceTask, n: int, seed: int, world_seed: int = 0) -> Split:
    """``n`` samples. ``world_seed`` fixes the task itself (prototypes, projections); ``seed``
    draws the samples, so different seeds give different splits of one task."""
    world = torch.Generator().manual_seed(10_000 + world_seed)
    rng = torch.Generator().manual_seed(seed)
    k, d = task.latent_dim, task.input_dim
    if task.kind == "classification":
        target = torch.randint(task.classes, (n,), generator=rng)
    latents, inputs = [], {}
    for spec in task.modalities:
        if task.kind == "classification":
            prototypes = torch.randn(task.classes, k, generator=world)
            latent = prototypes[target] + spec.noise * torch.randn(n, k, generator=rng)
        else:
            latent = torch.randn(n, k, generator=rng)
        latents.append(latent)
        inputs[spec.name] = _encode(spec, latent, d, world, rng)
    if task.kind == "regression":
        weights = [torch.randn(k, generator=world) for _ in task.modalities]
        signal = sum(lat @ w for lat, w in zip(latents, weights))
        target = (signal / signal.new_tensor(sum(float(w.norm() ** 2) for w in weights)).sqrt()).unsqueeze(1)
    return Split(inputs, target)


def _encode(spec: ModalitySpec, latent: Tensor, d: int, world, rng) -> Tensor:
    n, k = latent.shape
    if spec.encoding == "linear":
        raw = latent
    elif spec.encoding == "product":
        signs = torch.randint(0, 2, (n, k), generator=rng).float() * 2 - 1
        raw = torch.cat([signs, signs * latent], dim=1)
    else:
        raise ValueError(f"unknown encoding {spec.encoding!r}")
    projection, _ = torch.linalg.qr(torch.randn(d, d, generator=world))
    x = raw @ projection[: raw.shape[1]]
    return x + 0.05 * torch.randn(n, d, generator=rng)


class LateFusionNet(LateFusion):
    """One MLP encoder per modality (``hidden`` units, ``feature_dim`` features), concatenation
    and a fused head (see :class:`~multimodal_general.tasks.fusion.LateFusion`)."""

    def __init__(
        self, input_dims: dict[str, int], out_dim: int, hidden: int = 64, feature_dim: int = 32,
        fusion_head: str = "mlp",
    ):
        encoders = {name: nn.Sequential(mlp(dim, hidden, feature_dim), nn.ReLU()) for name, dim in input_dims.items()}
        super().__init__(encoders, feature_dim, out_dim, fusion_head)


# ---------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class RunConfig:
    task: str = "cls2"
    balancer: str = "none"
    preset: str = "stable"
    seed: int = 0
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05
    rho: float = 1.2
    lam: float = 0.1
    train_size: int = 4000
    val_size: int = 4000
    fusion_head: str = "auto"  # "auto" (linear for ogm_ge, else mlp), "mlp" or "linear" (see build)
    balancer_options: dict = field(default_factory=dict)  # e.g. {"alpha": 0.5}: each method takes what it declares

    @property
    def method(self) -> str:
        return f"cggm-{self.preset}" if self.balancer == "cggm" else self.balancer


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
    balancer = attach_balancer(
        model, config.balancer, criterion, task.kind,
        **{"preset": config.preset, "rho": config.rho, "lam": config.lam, **config.balancer_options},
    )
    return model, balancer, criterion


def fusion_head_of(config: RunConfig) -> str:
    """The fused head a run gets: ``auto`` -> ``linear`` for ``ogm_ge``, else ``mlp``."""
    if config.fusion_head == "auto":
        return "linear" if config.balancer == "ogm_ge" else "mlp"
    return config.fusion_head


def train_model(config: RunConfig, train: Split, progress=None, on_epoch=None, on_start=None):
    """Build and train under ``config`` on ``train``; returns ``(model, balancer, telemetry,
    step_seconds)``. ``on_epoch(epoch, model, balancer)`` runs after every epoch (e.g. a
    validation for model selection), ``on_start(model, balancer)`` once before the first
    (e.g. G-Blending's first loss measurement); neither may use the global torch RNG.

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
    if on_start is not None:
        on_start(model, balancer)
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
        "config": asdict(config),
        "method": config.method,
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
