"""The signal behind every synthetic dataset: per-modality evidence of one target, with a
controllable imbalance, embedded in variable-length feature sequences.

The format writers (``mosi``, ``iemocap``, ``food101``) draw a target and one latent vector
per modality with :func:`latent_evidence`, then turn each latent into what their format
stores (:func:`embed_in_sequences` for feature sequences; images and words for Food-101).

Each modality carries *independent* evidence, so the best fused prediction needs all of
them; ``strengths[m]`` is modality m's signal-to-noise ratio. With one strong modality and
weak others, joint training leans on the strong one: the imbalance CGGM is meant for.

* classification: ``latent_m = strength_m * P_m[y] + noise`` with class prototypes ``P_m``
  (unit-variance entries) of each modality;
* regression: ``y = c * sum_m s_m`` over independent standard normal scores ``s_m``, clipped
  to ``[-limit, limit]``; modality m observes ``s_m`` along a fixed direction of its latent,
  plus noise of std ``1 / strength_m``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from multimodal_general.errors import ConfigurationError


def imbalanced_strengths(modalities: Sequence[str], dominant: str, strong: float, ratio: float) -> dict[str, float]:
    """``dominant`` gets ``strong``, every other modality ``strong / ratio`` (``ratio >= 1``)."""
    if dominant not in modalities:
        raise ConfigurationError(f"dominant modality {dominant!r} is not one of {list(modalities)}")
    if ratio < 1 or strong <= 0:
        raise ConfigurationError(f"the imbalance ratio must be >= 1 and the strength > 0, got {ratio} and {strong}")
    return {m: strong if m == dominant else strong / ratio for m in modalities}


def latent_evidence(
    kind: str,
    n: int,
    strengths: Mapping[str, float],
    rng: np.random.Generator,
    world: np.random.Generator,
    classes: int = 4,
    latent_dim: int = 8,
    limit: float = 3.0,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(target, {modality: latent [n, latent_dim]})``.

    ``world`` fixes the task (prototypes, directions) and must be seeded the same for every
    split of one dataset; ``rng`` draws the samples. Targets: int64 class indices ``[n]`` or
    float32 values ``[n]`` in ``[-limit, limit]``.
    """
    latents: dict[str, np.ndarray] = {}
    if kind == "classification":
        target = rng.integers(0, classes, n)
        for m, strength in strengths.items():
            prototypes = world.standard_normal((classes, latent_dim))
            latents[m] = (strength * prototypes[target] + rng.standard_normal((n, latent_dim))).astype(np.float32)
        return target.astype(np.int64), latents
    if kind != "regression":
        raise ValueError(f"unknown kind {kind!r}")
    scores = {m: rng.standard_normal(n) for m in strengths}
    total = sum(scores.values()) / np.sqrt(len(scores))  # standard normal
    target = np.clip(limit * 0.6 * total, -limit, limit).astype(np.float32)
    for m, strength in strengths.items():
        direction = world.standard_normal(latent_dim)
        direction /= np.linalg.norm(direction)
        noise = rng.standard_normal((n, latent_dim)) / strength
        latents[m] = (scores[m][:, None] * direction + noise).astype(np.float32)
    return target, latents


def random_lengths(n: int, low: int, high: int, rng: np.random.Generator) -> np.ndarray:
    """Sequence lengths uniform in ``[low, high]`` (``low >= 1``)."""
    return rng.integers(max(1, low), high + 1, n)


def embed_in_sequences(
    latent: np.ndarray,
    lengths: np.ndarray,
    dim: int,
    rng: np.random.Generator,
    world: np.random.Generator,
    signal_fraction: float = 0.5,
    noise: float = 0.5,
) -> list[np.ndarray]:
    """One ``[length_i, dim]`` float32 sequence per sample: every step is noise, and on about
    ``signal_fraction`` of the steps (at least one) the latent, projected by a fixed random
    matrix, is added. Pooling over the real steps recovers the latent; padding does not."""
    projection = world.standard_normal((latent.shape[1], dim)) / np.sqrt(latent.shape[1])
    signal = latent @ projection
    sequences = []
    for i, length in enumerate(lengths):
        gate = rng.random(length) < signal_fraction
        gate[rng.integers(length)] = True
        steps = noise * rng.standard_normal((length, dim)) + gate[:, None] * signal[i]
        sequences.append(steps.astype(np.float32))
    return sequences
