"""The numpy chain's preprocessing and its inversion: the input's grid -> the network's
grid and back, without torch or MONAI.

It does what the MONAI inference chain (:func:`brats_cggm.data.transforms.image_transforms`
and :func:`~brats_cggm.data.transforms.invert_prediction`, MONAI 1.6) does, step by step,
on the same grids:

1. **orientation** to the card's axis codes: flips and an axis permutation (nibabel's
   orientation of the affine; no interpolation);
2. **spacing** to the card's voxel size: the output keeps the axes' directions and takes
   the new voxel size (an axis already within 1e-3 mm of it keeps its own); its shape is
   ``round(extent / spacing + 1)`` and its first voxel sits on the input's corner voxel;
   values by linear interpolation at the voxel centres, clamped to the border; no
   resampling at all when the grid is (within 1e-3) unchanged; then every value whose
   magnitude is within ``NOISE_FLOOR`` of its sequence's largest value set to 0 (rounding noise of the
   resampled background, see :data:`~brats_cggm.data.preprocessing.NOISE_FLOOR`);
3. **crop** to the box of voxels where any sequence is > 0;
4. **z-score** of each sequence over its non-zero voxels (population std; 0 -> 1).

The inversion pads the network's maps with zeros back to the spacing grid, resamples
them linearly (clamped to the border) onto the oriented input grid and undoes the
orientation.

Faster than the MONAI chain, with the same values: only the box that can hold foreground
is resampled (found on the input before resampling), and only the box that the cropped
maps reach is inverted; an axis-aligned resampling (every grid that is not sheared) is
one linear interpolation per axis, done for all maps at once, in float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from nibabel import orientations

from brats_cggm.data.preprocessing import NOISE_FLOOR, PreprocessConfig, constant_background

#: MONAI's tolerance: a voxel size within it of the target is kept, and a resampling
#: whose voxel mapping is within it of the identity is skipped
AFFINE_TOL = 1e-3
#: off-diagonal terms of a voxel mapping below this count as zero (axis-aligned)
ALIGNED_TOL = 1e-6


class EmptyImage(ValueError):
    """Every voxel of every sequence is 0: there is nothing to crop to."""


@dataclass(frozen=True)
class Geometry:
    """How one case's grid maps to the network's, to go back with :meth:`invert`."""

    #: the input's spatial shape
    shape: tuple[int, int, int]
    #: nibabel orientation from the input's axes to the card's
    ornt: np.ndarray
    #: the oriented input's shape and affine
    oriented_shape: tuple[int, int, int]
    oriented_affine: np.ndarray
    #: the spacing grid's shape and affine
    grid_shape: tuple[int, int, int]
    grid_affine: np.ndarray
    #: the crop (start, stop per axis) on the spacing grid
    box: tuple[tuple[int, int], ...]
    #: whether the spacing step resamples (False: the spacing grid is the oriented grid)
    resampled: bool

    def invert(self, maps: np.ndarray) -> np.ndarray:
        """``maps`` ``[C, *box]`` on the network's grid -> float32 ``[C, *shape]`` on the
        input's grid (zero where the maps do not reach)."""
        maps = np.asarray(maps, dtype=np.float32)
        out = np.zeros((maps.shape[0], *self.shape), dtype=np.float32)
        oriented = orient(out, self.ornt)  # a view: writing into it fills ``out``
        if not self.resampled:
            oriented[(slice(None), *(slice(a, b) for a, b in self.box))] = maps
            return out
        xform = np.linalg.solve(self.grid_affine, self.oriented_affine)  # oriented voxel -> grid voxel
        if not axis_aligned(xform):
            full = np.zeros((maps.shape[0], *self.grid_shape), dtype=np.float32)
            full[(slice(None), *(slice(a, b) for a, b in self.box))] = maps
            oriented[...] = _resample_general(full, xform, self.oriented_shape)
            return out
        padded = np.pad(maps, [(0, 0)] + [(1, 1)] * 3)  # one zero slab on each side of the box
        block, axes = [], []
        for axis, ((start, stop), size) in enumerate(zip(self.box, self.oriented_shape)):
            lo, hi, w = linear_weights(xform[axis, axis], xform[axis, 3], size, self.grid_shape[axis])
            reach = np.flatnonzero((hi >= start) & (lo < stop))  # outside: both neighbours are padding, 0
            if reach.size == 0:
                return out
            first, last = int(reach[0]), int(reach[-1]) + 1
            block.append(slice(first, last))
            shift = 1 - start
            axes.append((np.clip(lo[first:last] + shift, 0, stop - start + 1),
                         np.clip(hi[first:last] + shift, 0, stop - start + 1), w[first:last]))
        oriented[(slice(None), *block)] = interpolate(padded, axes)
        return out


def orient(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """``array`` ``[C, *spatial]`` flipped and permuted by ``ornt`` (a view)."""
    flips = [1 + axis for axis, flip in enumerate(ornt[:, 1]) if flip == -1]
    out = np.flip(array, axis=flips) if flips else array
    return out.transpose(0, *(1 + np.argsort(ornt[:, 0])))


def axis_aligned(xform: np.ndarray) -> bool:
    return bool(np.all(np.abs(xform[:3, :3] - np.diag(np.diag(xform[:3, :3]))) < ALIGNED_TOL))


def linear_weights(scale: float, offset: float, size_out: int, size_in: int) -> tuple[np.ndarray, ...]:
    """Linear interpolation along one axis, clamped to the border: output voxel ``j``
    reads input ``x = scale * j + offset`` as ``(1 - w) * in[lo] + w * in[hi]``."""
    x = np.clip(scale * np.arange(size_out, dtype=np.float64) + offset, 0, size_in - 1)
    lo = np.floor(x).astype(np.intp)
    return lo, np.minimum(lo + 1, size_in - 1), (x - lo).astype(np.float32)


def interpolate(data: np.ndarray, axes: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """``data`` ``[C, X, Y, Z]`` interpolated along each spatial axis by ``(lo, hi, w)``,
    the axis that shrinks most first; float32."""
    order = sorted(range(3), key=lambda a: len(axes[a][0]) / max(data.shape[1 + a], 1))
    for axis in order:
        lo, hi, w = axes[axis]
        shape = [1] * data.ndim
        shape[1 + axis] = -1
        w = w.reshape(shape)
        low = np.take(data, lo, axis=1 + axis).astype(np.float32, copy=False)
        high = np.take(data, hi, axis=1 + axis).astype(np.float32, copy=False)
        low *= 1 - w
        high *= w
        low += high
        data = low
    return np.asarray(data, dtype=np.float32)


def _resample_general(data: np.ndarray, xform: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Trilinear resampling by a full voxel mapping (sheared grids), clamped to the
    border, a slab of the output's first axis at a time: float32 ``[C, *shape]``."""
    size = np.asarray(data.shape[1:])
    out = np.empty((data.shape[0], *shape), dtype=np.float32)
    rest = np.indices(tuple(shape[1:]), dtype=np.float64).reshape(2, -1)
    for x in range(shape[0]):
        voxels = np.vstack([np.full((1, rest.shape[1]), float(x)), rest])
        coords = np.clip(xform[:3, :3] @ voxels + xform[:3, 3:], 0, (size - 1)[:, None])
        lo = np.floor(coords).astype(np.intp)
        hi = np.minimum(lo + 1, (size - 1)[:, None])
        w = (coords - lo).astype(np.float32)
        slab = np.zeros((data.shape[0], rest.shape[1]), dtype=np.float32)
        for corner in range(8):
            pick = [(hi if corner >> a & 1 else lo)[a] for a in range(3)]
            weight = np.prod([w[a] if corner >> a & 1 else 1 - w[a] for a in range(3)], axis=0)
            slab += data[:, pick[0], pick[1], pick[2]].astype(np.float32, copy=False) * weight
        out[:, x] = slab.reshape(data.shape[0], *shape[1:])
    return out


def spacing_grid(affine: np.ndarray, shape: Sequence[int], spacing: Sequence[float]) -> tuple[np.ndarray, tuple[int, ...]]:
    """The affine and shape of the grid with voxel size ``spacing`` that keeps the axes'
    directions of ``affine`` (MONAI's ``Spacing(diagonal=False)``)."""
    linear = affine[:3, :3]
    current = np.sqrt((linear**2).sum(axis=0))
    target = np.array([c if abs(c - s) <= AFFINE_TOL else s for c, s in zip(current, spacing)])
    zoom = np.linalg.cholesky(linear.T @ linear).T  # linear = rotation @ zoom
    rotation = linear @ np.linalg.inv(zoom)
    grid = np.eye(4)
    grid[:3, :3] = rotation @ np.diag(np.sign(np.diag(zoom)) * target)
    corners = np.array(np.meshgrid(*[(0.0, n - 1.0) for n in shape], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones((1, corners.shape[1]))])
    in_grid = np.linalg.solve(grid, affine) @ corners
    out_shape = np.round(np.ptp(in_grid[:3], axis=1) + 1.0)
    world = affine @ corners
    offset = None
    for i in range(corners.shape[1]):
        if np.allclose(np.min(in_grid[:3] - in_grid[:3, i:i + 1], axis=1), 0.0, rtol=AFFINE_TOL):
            offset = world[:3, i]  # the corner lowest on every output axis becomes voxel 0
            break
    if offset is None:  # no such corner: centres aligned
        offset = linear @ (np.asarray(shape) / 2.0) + affine[:3, 3] - grid[:3, :3] @ (out_shape / 2.0)
    grid[:3, 3] = offset
    return grid, tuple(int(v) for v in out_shape)


def preprocess(arrays: Mapping[str, np.ndarray], order: Sequence[str], affine: np.ndarray,
               config: PreprocessConfig) -> tuple[np.ndarray, Geometry]:
    """The network input ``[len(order), *box]`` (float32; a missing sequence is zeros) of
    the 3-D ``arrays`` on the grid ``affine``, and the geometry to invert its maps with."""
    affine = np.asarray(affine, dtype=np.float64)
    shape = tuple(int(v) for v in next(iter(arrays.values())).shape)
    ornt = orientations.ornt_transform(orientations.io_orientation(affine),
                                       orientations.axcodes2ornt(config.orientation))
    oriented_affine = affine @ orientations.inv_ornt_aff(ornt, shape)
    views = {m: orient(np.asarray(a)[None], ornt)[0] for m, a in arrays.items()}
    for m, view in views.items():
        background = constant_background(view)
        if background is not None:
            views[m] = np.where(background, np.float32(0), view.astype(np.float32, copy=False))
    oriented_shape = tuple(next(iter(views.values())).shape)
    grid_affine, grid_shape = spacing_grid(oriented_affine, oriented_shape, config.spacing)
    xform = np.linalg.solve(oriented_affine, grid_affine)  # grid voxel -> oriented voxel
    resampled = not (grid_shape == oriented_shape and (
        np.allclose(oriented_affine, grid_affine, atol=AFFINE_TOL) or np.allclose(xform, np.eye(4), atol=AFFINE_TOL)))
    if not resampled:
        grid_affine, grid_shape = oriented_affine, oriented_shape
    inside = _foreground_box(views.values())
    if inside is None:
        raise EmptyImage("every voxel of every sequence is 0 (or one constant)")
    if resampled and axis_aligned(xform):
        block, axes = [], []
        for axis in range(3):  # the grid voxels whose neighbours reach the input's foreground box
            lo, hi, w = linear_weights(xform[axis, axis], xform[axis, 3], grid_shape[axis], oriented_shape[axis])
            reach = np.flatnonzero((hi >= inside[axis][0]) & (lo < inside[axis][1]))
            first, last = int(reach[0]), int(reach[-1]) + 1
            src = slice(int(lo[first:last].min()), int(hi[first:last].max()) + 1)
            block.append((first, src))
            axes.append((lo[first:last] - src.start, hi[first:last] - src.start, w[first:last]))
        sources = tuple(src for _, src in block)
        channels = {m: interpolate(v[sources][None], axes)[0] for m, v in views.items()}
        origin = [first for first, _ in block]
    elif resampled:
        channels = {m: _resample_general(v[None], xform, grid_shape)[0] for m, v in views.items()}
        origin = [0, 0, 0]
    else:
        sources = tuple(slice(a, b) for a, b in inside)
        channels = {m: np.array(v[sources], dtype=np.float32) for m, v in views.items()}
        origin = [a for a, _ in inside]
    for values in channels.values():
        _drop_noise(values)
    box = _foreground_box(channels.values())
    if box is None:
        raise EmptyImage("every voxel of every sequence is 0 after resampling")
    crop = tuple(slice(a, b) for a, b in box)
    block_shape = tuple(b - a for a, b in box)
    image = np.zeros((len(order), *block_shape), dtype=np.float32)
    for i, m in enumerate(order):
        if m in channels:
            image[i] = channels[m][crop]
            _zscore_nonzero(image[i])
    box = tuple((o + a, o + b) for o, (a, b) in zip(origin, box))
    return image, Geometry(shape, ornt, oriented_shape, oriented_affine, grid_shape, grid_affine, box, resampled)


def _foreground_box(volumes) -> tuple[tuple[int, int], ...] | None:
    """(start, stop) per axis of the non-zero voxels in any of ``volumes``; None when none is."""
    starts, stops = [None] * 3, [None] * 3
    for volume in volumes:
        positive = volume != 0
        for axis in range(3):
            hits = np.flatnonzero(positive.any(axis=tuple(a for a in range(3) if a != axis)))
            if hits.size:
                starts[axis] = hits[0] if starts[axis] is None else min(starts[axis], hits[0])
                stops[axis] = hits[-1] + 1 if stops[axis] is None else max(stops[axis], hits[-1] + 1)
    if starts[0] is None:
        return None
    return tuple((int(a), int(b)) for a, b in zip(starts, stops))


def _drop_noise(channel: np.ndarray) -> None:
    """In place: values whose magnitude is within ``NOISE_FLOOR`` of the largest value
    become 0 (the resampled block holds every voxel > 0 of the resampled grid, so its
    largest value is the grid's)."""
    if channel.size:
        channel[np.abs(channel) <= NOISE_FLOOR * max(float(channel.max()), 0.0)] = 0


def _zscore_nonzero(channel: np.ndarray) -> None:
    """In place: the non-zero voxels minus their mean, over their std (1 when 0)."""
    mask = channel != 0
    if not mask.any():
        return
    values = channel[mask]
    mean = values.mean(dtype=np.float64)
    std = values.std(dtype=np.float64)
    channel[mask] = (values - mean) / (std if std != 0 else 1.0)
