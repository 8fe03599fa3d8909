"""Connected components of a 3-D mask, and a mask's bounding box, with numpy only (the
torch-free, SciPy-free install).

The mask's runs along the last axis are the graph's nodes; two runs touch when they lie
in neighbouring rows and overlap (6-connectivity: face neighbours; 26: also edges and
corners, so a run reaches one voxel further). The graph's components come from a
vectorised minimum-label propagation with pointer jumping. The partition is the one
``scipy.ndimage.label`` gives with the matching structure (``tests/test_postprocessing.py``
holds them together), numbered in the order of each component's first voxel (C order).
"""

from __future__ import annotations

import numpy as np

CONNECTIVITIES = (6, 26)


def label_components(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, sizes)``: int32 labels of ``mask``'s components (0 outside, 1..n in the
    order of their first voxel) and each component's voxel count (``sizes[k - 1]``)."""
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be 6 or 26; got {connectivity}")
    mask = np.asarray(mask, dtype=bool)
    labels = np.zeros(mask.shape, dtype=np.int32)
    if not mask.any():
        return labels, np.zeros(0, dtype=np.int64)
    rows, starts, ends = _runs(mask)
    first, second = _touching_runs(rows, starts, ends, mask.shape, connectivity)
    component = _graph_components(len(rows), first, second)
    lengths = ends - starts
    labels.reshape(-1)[np.flatnonzero(mask)] = np.repeat(component + 1, lengths)
    return labels, np.bincount(component, weights=lengths).astype(np.int64)


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row (flat index over the first two axes), start and end (exclusive) of every run
    of True along the last axis, in C order."""
    flat = mask.reshape(-1, mask.shape[-1])
    padded = np.zeros((flat.shape[0], flat.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = flat
    steps = np.diff(padded, axis=1)
    rows, starts = np.nonzero(steps == 1)
    _, ends = np.nonzero(steps == -1)
    return rows, starts, ends


def _touching_runs(rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, shape: tuple[int, ...],
                   connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of runs that touch, as two index arrays (each pair once)."""
    depth, height, width = shape
    reach = 1 if connectivity == 26 else 0
    stride = width + 4  # keys of different rows never mix
    start_keys, end_keys = rows * stride + starts, rows * stride + ends
    offsets = ((1, -1), (1, 0), (1, 1), (0, 1)) if connectivity == 26 else ((1, 0), (0, 1))
    a, b = np.divmod(rows, height)
    firsts, seconds = [], []
    for da, db in offsets:
        valid = (a + da < depth) & (b + db >= 0) & (b + db < height)
        runs = np.flatnonzero(valid)
        target = (rows[runs] + da * height + db) * stride
        low = np.searchsorted(end_keys, target + starts[runs] - reach, side="right")
        high = np.searchsorted(start_keys, target + ends[runs] + reach, side="left")
        counts = np.maximum(high - low, 0)
        firsts.append(np.repeat(runs, counts))
        offsets_in_range = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        seconds.append(np.repeat(low, counts) + offsets_in_range)
    return np.concatenate(firsts), np.concatenate(seconds)


def _graph_components(count: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Component index (0..n-1, in order of the lowest node) of each of ``count`` nodes."""
    label = np.arange(count)
    while True:
        new = label.copy()
        np.minimum.at(new, first, label[second])
        np.minimum.at(new, second, label[first])
        new = new[new]
        if np.array_equal(new, label):
            break
        label = new
    _, component = np.unique(label, return_inverse=True)
    return component.reshape(-1)


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every True voxel of ``mask``; None when there is none."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not hit.size:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)
