"""Smoothing of per-step training curves for plots."""

from __future__ import annotations

import numpy as np


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over the finite values (shorter windows at the ends); NaN where
    a window holds no finite value."""
    values = np.asarray(values, dtype=float)
    if window <= 1 or values.size == 0:
        return np.where(np.isfinite(values), values, np.nan)
    finite = np.isfinite(values)
    kernel = np.ones(window)
    total = np.convolve(np.where(finite, values, 0.0), kernel, mode="same")
    count = np.convolve(finite.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0.5, total / np.maximum(count, 1.0), np.nan)
