"""Brain extraction with deepbet's two networks, run by ONNX Runtime from the weights this
package ships (``brats_cggm/raw/weights``: no torch, no download).

The steps follow the deepbet paper (Fisch et al., Comput Biol Med 2024) on a 1 mm grid whose
axes run R, A, S (the orientation deepbet was trained in): intensities clipped to the 0.5 and
99.5 percentiles and standardised; at 128³ the box network finds the brain; the box (10 %
margin) goes to the mask network at 256³; the mask comes back by nearest-neighbour, its largest
component is kept and its holes filled. deepbet was trained on T1-weighted images of adults;
:func:`choose_sequence` says which sequence of a case it runs on.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

from brats_cggm.raw.grids import from_xyz, ras_grid, to_xyz

#: the networks' input sizes
BOX_SHAPE = (128, 128, 128)
MASK_SHAPE = (256, 256, 256)
BOX_MARGIN = 0.1
#: the order deepbet prefers: T1, then the T1-weighted post-contrast image
SEQUENCE_ORDER = ("t1", "t1ce")


@dataclass(frozen=True)
class BrainMask:
    """The mask (``SimpleITK.Image``, uint8 {0, 1}, 1 mm RAS grid) and the sequence it was drawn on."""

    image: object
    sequence: str
    volume_ml: float


def choose_sequence(present: list[str] | tuple[str, ...]) -> tuple[str | None, str]:
    """The sequence to extract the brain from, and what to tell the user about it."""
    if "t1" in present:
        return "t1", "deepbet on the T1 (the contrast it was trained on)"
    if "t1ce" in present:
        return "t1ce", "deepbet on the T1ce: no T1 in this case (deepbet was trained on T1; T1ce is T1-weighted)"
    return None, "no T1-weighted sequence (T1 or T1ce): deepbet cannot extract the brain"


@lru_cache(maxsize=1)
def _sessions():
    import onnxruntime as ort

    weights = resources.files("brats_cggm.raw") / "weights"
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return tuple(
        ort.InferenceSession((weights / f"deepbet_{name}.onnx").read_bytes(), options, providers=["CPUExecutionProvider"])
        for name in ("bbox", "brain")
    )


def _resize_nearest(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resize with pixel-centre alignment (PyTorch's ``nearest-exact``)."""
    index = [np.minimum(((np.arange(n) + 0.5) * (m / n)).astype(np.int64), m - 1) for n, m in zip(shape, array.shape)]
    return array[np.ix_(*index)]


def _normalise(x: np.ndarray, low: float, high: float) -> np.ndarray:
    x = np.clip((x - low) / max(high - low, 1e-6), 0.0, 1.0)
    return (0.226 * (x - x.mean()) / max(float(x.std()), 1e-6) + 0.449).astype(np.float32)


def _largest_component(mask: np.ndarray, fill: bool = False) -> np.ndarray:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(image), sortByObjectSize=True)
    largest = labels == 1
    if fill:
        largest = sitk.BinaryFillhole(largest)
    return sitk.GetArrayFromImage(largest).astype(bool)


def _box(mask_small: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The brain's box on the full grid, grown by ``BOX_MARGIN`` on each side."""
    box = []
    for axis, n in enumerate(shape):
        other = tuple(a for a in range(3) if a != axis)
        rows = np.flatnonzero(mask_small.mean(axis=other) > 0.02)
        if rows.size == 0:
            raise ValueError("the box network found no brain")
        scale = n / mask_small.shape[axis]
        centre, size = scale * (rows.max() + 1 + rows.min()) / 2, scale * (rows.max() + 1 - rows.min())
        size = (1 + 2 * BOX_MARGIN) * size
        centre, size = round(centre), round(size)
        box.append(slice(max(0, int(centre - size / 2)), min(n, int(centre + size / 2))))
    return tuple(box)


def mask_array(x: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """The brain mask of a T1-weighted volume ``x`` (x, y, z) on a ~1 mm R-A-S grid."""
    box_net, mask_net = _sessions()
    x = np.nan_to_num(np.asarray(x, dtype=np.float32))
    small = _resize_nearest(x, BOX_SHAPE)
    low, high = (float(v) for v in np.quantile(small, [0.005, 0.995]))
    p_small = box_net.run(None, {"image": _normalise(small, low, high)[None, None]})[0][0, 1]
    box = _box(_largest_component(p_small > 0.5), x.shape)
    crop = _resize_nearest(x[box], MASK_SHAPE)
    p = mask_net.run(None, {"image": _normalise(crop, low, high)[None, None]})[0][0, 1]
    mask = np.zeros(x.shape, dtype=bool)
    mask[box] = _resize_nearest(p, x[box].shape) > threshold
    if mask.any():
        mask[box] = _largest_component(mask[box], fill=True)
    return mask


def extract(image, sequence: str, space=None, transform=None) -> BrainMask:
    """The brain mask of ``image`` (a T1-weighted ``SimpleITK.Image``) on a 1 mm R-A-S grid
    over the field of view of ``space`` (default: the image); ``transform`` (ITK convention:
    a point of ``space`` -> a point of ``image``) when ``space`` is another sequence's."""
    import SimpleITK as sitk

    grid = ras_grid(space if space is not None else image)
    resampled = sitk.Resample(image, grid, transform or sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    mask = mask_array(to_xyz(resampled))
    volume = float(mask.sum()) * float(np.prod(grid.GetSpacing())) / 1000.0
    return BrainMask(from_xyz(mask.astype(np.uint8), grid), sequence, volume)
