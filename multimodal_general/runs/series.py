"""Smoothing of per-step training curves for plots, and the mean ± std of per-seed results."""

from __future__ import annotations

import math
import statistics

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


def smoothing_window(n: int) -> int:
    """The moving-average window for a curve of ``n`` points: 4 % of it, at most 50."""
    return int(max(1, min(50, n // 25)))


def smoothing_label(window: int, unit: str = "steps") -> str:
    if window > 1:
        return f"moving average over {window} {unit}"
    return "one value per epoch" if unit == "epochs" else "unsmoothed"


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite numbers among ``values`` (std 0 for one;
    ``(nan, nan)`` for none)."""
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def plus_minus(pair, digits: int = 3) -> str:
    """``"mean ± std"``, or ``"—"`` when the mean is not a finite number."""
    mean, std = pair
    return "—" if not math.isfinite(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"
