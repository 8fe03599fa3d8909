"""Contribution maps small enough to download: int8 voxels with the scale in the NIfTI
header (``scl_slope``), cropped to one box shared by a case's sequences, gzip-compressed.

Every reader that applies ``scl_slope`` (nibabel, ITK and so SimpleITK, 3D Slicer and
ITK-SNAP) reads back ``value * slope``, within ``slope / 2`` of the float map, where
``slope = max |value| / 127`` over the file. The box is the smallest one that holds every
voxel that is non-zero after rounding (the model sees only the brain's foreground box,
so the maps are zero outside it); the affine is moved to the box's first voxel, so a
cropped map overlays the full-grid image in world coordinates.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable

import nibabel as nib
import numpy as np

from brats_cggm.inference.components import bounding_box

LEVELS = 127  # int8: -127..127, symmetric around 0
COMPRESSION = 6


def slope(maps: np.ndarray) -> float:
    """The step of ``maps``' int8 code (1.0 for all-zero maps)."""
    return _step(float(np.max(np.abs(maps))) if maps.size else 0.0)


def _step(top: float) -> float:
    return top / LEVELS if top > 0 else 1.0


def quantise(maps: np.ndarray, step: float) -> np.ndarray:
    """``round(maps / step)`` as int8 (``maps`` within ``LEVELS * step``)."""
    return np.clip(np.rint(maps / np.float32(step)), -LEVELS, LEVELS).astype(np.int8)


def shared_box(all_maps: Iterable[np.ndarray]) -> tuple[slice, slice, slice]:
    """The smallest box of the grid (``[C, X, Y, Z]`` maps) holding every voxel of every
    map that is non-zero once quantised; one voxel when all are zero."""
    occupied = None
    for maps in all_maps:
        peak = np.max(np.abs(maps), axis=0)
        nonzero = peak / np.float32(_step(float(peak.max()))) > 0.5  # as quantise rounds (0.5 to 0)
        occupied = nonzero if occupied is None else occupied | nonzero
    box = bounding_box(occupied) if occupied is not None else None
    return box or (slice(0, 1),) * 3


def box_affine(affine: np.ndarray, box: tuple[slice, slice, slice]) -> np.ndarray:
    """The affine of the sub-grid that starts at ``box``'s first voxel."""
    moved = np.array(affine, dtype=float)
    moved[:3, 3] = affine[:3, :3] @ np.array([s.start for s in box], float) + affine[:3, 3]
    return moved


def compact_nifti(maps: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None,
                  box: tuple[slice, slice, slice]) -> bytes:
    """``maps`` (``[C, X, Y, Z]`` float) cropped to ``box``, channels last, int8 with
    ``scl_slope``, as gzip-compressed NIfTI-1 bytes keeping ``header``'s codes."""
    step = slope(maps)
    data = np.ascontiguousarray(np.moveaxis(quantise(maps[(slice(None), *box)], step), 0, -1))
    moved = box_affine(affine, box)
    image = nib.Nifti1Image(data, moved, header.copy() if header is not None else None)
    image.header.set_data_dtype(np.int8)
    if header is not None:  # keep the input's sform/qform codes; the matrices are the box's
        image.set_sform(moved, int(header["sform_code"]) or 1)
        image.set_qform(moved, int(header["qform_code"]) or 1)
    image.header.set_slope_inter(step, 0.0)
    image.header["cal_min"], image.header["cal_max"] = -LEVELS * step, LEVELS * step
    return gzip.compress(image.to_bytes(), compresslevel=COMPRESSION, mtime=0)
