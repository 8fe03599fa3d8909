"""CGGM's balancing coefficients ``B_i`` from the per-modality improvements ``d_i`` (or, for
the ``deficit`` variant, from the heads' levels).

Pure tensor functions (no host synchronisation), so they are easy to test against
hand-computed values and cheap on a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The divisor guard of the authors' code: with it, improvements that cancel give ~1e6.
PAPER_DIVISOR_EPS = 1e-8


def paper_coefficients(improvement: Tensor, rho: float) -> Tensor:
    """``B_i = rho * (sum_{k != i} d_k) / (sum_k d_k)``, exactly as published.

    Unguarded: when the improvements (nearly) cancel, the coefficients explode, and with
    mixed signs some are negative (that encoder's gradient is reversed).
    """
    total = improvement.sum()
    return rho * (total - improvement) / (total + PAPER_DIVISOR_EPS)


def stable_coefficients(
    improvement: Tensor, rho: float, min_signal: float
) -> tuple[Tensor, Tensor]:
    """Guarded coefficients: ``(B, usable)``.

    A modality that is not improving (``d_i <= 0``) counts as improving by zero, i.e. as
    lagging. With ``d+ = max(d, 0)`` and ``S = sum_k d+_k``,
    ``B_i = rho * (S - d+_i) / S``, which lies in ``[0, rho]`` and, as in the paper, sums to
    ``rho * (M - 1)``. When ``S <= min_signal`` there is no usable signal: ``B = 1`` (the
    gradients are left untouched) and ``usable`` is false.
    """
    positive = improvement.clamp_min(0)
    total = positive.sum()
    usable = total > min_signal
    coefficients = (rho * (total - positive) / total.clamp_min(min_signal)).clamp(0, rho)
    return torch.where(usable, coefficients, torch.ones_like(coefficients)), usable


def deficit_coefficients(level: Tensor, rho: float, min_signal: float) -> tuple[Tensor, Tensor]:
    """Coefficients from how far each head still is from a perfect score: ``(B, usable)``.

    With the deficit ``delta_i = max(1 - eps_i, 0)`` of each head's (smoothed) utilization
    ``eps_i`` (a metric whose best value is 1: accuracy, Dice) and their mean ``mean_k delta_k``,
    ``B_i = rho * delta_i / mean_k delta_k``: the coefficients average ``rho``, and the head that
    is furthest behind gets the largest. Unlike :func:`stable_coefficients` it reads levels,
    not rates, so a weak head that is catching up quickly still gets more than a strong one.
    With every deficit below ``min_signal`` (all heads perfect) there is nothing to balance:
    ``B = 1`` and ``usable`` is false.
    """
    deficit = (1 - level).clamp_min(0)
    total = deficit.sum()
    usable = total > min_signal
    coefficients = rho * deficit * len(deficit) / total.clamp_min(min_signal)
    return torch.where(usable, coefficients, torch.ones_like(coefficients)), usable


def ema_update(average: Tensor, value: Tensor, beta: float) -> None:
    """In place: ``average = beta * average + (1 - beta) * value``."""
    average.mul_(beta).add_(value, alpha=1 - beta)


def level(fast: Tensor, count: Tensor, fast_beta: float) -> Tensor:
    """The bias-corrected fast EMA of ``eps``: each head's smoothed current utilization."""
    return fast / (1 - fast_beta ** count)


def trend(fast: Tensor, slow: Tensor, count: Tensor, fast_beta: float, slow_beta: float) -> Tensor:
    """Smoothed improvement: the bias-corrected fast EMA minus the slow EMA of ``eps``.

    For a metric rising linearly by ``s`` per step this converges to
    ``s * (slow_lag - fast_lag)`` with ``lag = beta / (1 - beta)``, a positive multiple of the
    per-step improvement with far less noise than ``eps(t) - eps(t-1)`` (B is invariant to a
    common positive factor). Equal to zero after the first observation.
    """
    return level(fast, count, fast_beta) - slow / (1 - slow_beta ** count)
