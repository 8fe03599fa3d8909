"""Sliding-window inference in numpy, window for window as MONAI's
``sliding_window_inference`` does it with ``mode="gaussian"`` (MONAI 1.6), so that the
numpy chain and the MONAI chain blend the same windows with the same weights.

* A grid smaller than the window is padded with zeros (``diff // 2`` before, the rest
  after) and the padding cut off the result again.
* Windows start every ``int(roi * (1 - overlap))`` voxels (at least 1; a whole axis when
  the window fills it), the last one moved back to end at the border; they are visited in
  C order of their starts, ``batch`` at a time.
* Each window's output is weighted by a separable Gaussian (sigma = ``sigma_scale`` x the
  window's size per axis, on the voxel offsets from the window's centre, scaled to peak 1
  and floored at ``max(min, 1e-3)``); the blend is the weighted sum over the weight sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np

#: the Gaussian of MONAI's ``compute_importance_map`` (sigma = 0.125 x the window size)
SIGMA_SCALE = 0.125


@dataclass(frozen=True)
class Windowing:
    """How both chains cut a case into windows and blend them back (the model card's
    ``inference`` settings, see :func:`~brats_cggm.inference.card.windowing`)."""

    patch_size: tuple[int, ...]
    overlap: float
    #: windows per call of the network
    sw_batch_size: int = 2
    #: ``gaussian``, or ``constant`` for equal weights
    blend_mode: str = "gaussian"
    sigma_scale: float = SIGMA_SCALE


def gaussian_importance(patch: Sequence[int], sigma_scale: float = SIGMA_SCALE) -> np.ndarray:
    """The weight of each voxel of a window, float32 ``[*patch]``."""
    weights = None
    for size in patch:
        offsets = np.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=np.float32)
        axis = np.exp(offsets**2 / np.float32(-2 * (size * sigma_scale) ** 2)).astype(np.float32)
        weights = axis if weights is None else weights[..., None] * axis
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Where the windows along one axis of ``size`` (>= ``roi``) voxels start."""
    step = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    count = next((d for d in range(math.ceil(size / step)) if d * step + roi >= size), 0) + 1
    return [min(d * step, size - roi) for d in range(count)]


def window_count(shape: Sequence[int], patch: Sequence[int], overlap: float) -> int:
    """How many windows a grid of ``shape`` (padded to at least ``patch``) takes."""
    return math.prod(len(window_starts(max(int(s), int(r)), int(r), overlap)) for s, r in zip(shape, patch))


def sliding_window(image: np.ndarray, windowing: Windowing, predict: Callable[[np.ndarray], np.ndarray],
                   progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """``predict`` (``[B, C, *patch] -> [B, K, *patch]``, float32) over ``image`` ``[C, *grid]``,
    blended as ``windowing`` says: float32 ``[K, *grid]``."""
    patch, overlap, batch = tuple(int(p) for p in windowing.patch_size), windowing.overlap, windowing.sw_batch_size
    grid = image.shape[1:]
    short = [max(p - s, 0) for s, p in zip(grid, patch)]
    if any(short):
        image = np.pad(image, [(0, 0)] + [(d // 2, d - d // 2) for d in short])
    padded = image.shape[1:]
    windows = [tuple(slice(s, s + p) for s, p in zip(starts, patch))
               for starts in product(*(window_starts(n, p, overlap) for n, p in zip(padded, patch)))]
    weight = (gaussian_importance(patch, windowing.sigma_scale) if windowing.blend_mode == "gaussian"
              else np.ones(patch, dtype=np.float32))
    total = np.zeros(padded, dtype=np.float32)
    for window in windows:
        total[window] += weight
    out = None
    for first in range(0, len(windows), batch):
        group = windows[first:first + batch]
        outputs = predict(np.stack([image[(slice(None), *w)] for w in group]))
        if out is None:
            out = np.zeros((outputs.shape[1], *padded), dtype=np.float32)
        for window, values in zip(group, outputs):
            out[(slice(None), *window)] += values * weight
        if progress is not None:
            progress(first + len(group), len(windows))
    out /= total
    if any(short):
        out = out[(slice(None), *(slice(d // 2, d // 2 + s) for d, s in zip(short, grid)))]
    return out
