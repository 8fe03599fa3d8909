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

from dataclasses import dataclass

import torch
from torch import Tensor


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
