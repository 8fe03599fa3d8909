"""Three orthogonal views of a segmented case, drawn with numpy (and Pillow for resizing
and the orientation letters), fast enough to redraw on every slider move.

Everything is kept on the input's own voxel grid, turned to the nearest RAS axes (no
resampling), and shown in radiological convention: the patient's right on the image's
left, anterior up in axial views, superior up in coronal and sagittal views, the face to
the left in sagittal views. Pixels are stretched to the voxel size, so the aspect is true.

The volumes live in ``.npy`` files in the session's folder, read through memory maps: a
slider move reads one slice, and a session keeps almost nothing in memory. The
contribution maps are kept only inside the box where they are non-zero (zero outside).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel.orientations import apply_orientation, io_orientation
from PIL import Image, ImageDraw, ImageFont

from brats_cggm.data.labels import REGIONS

VIEWS = ("axial", "coronal", "sagittal")
#: the RAS axis each view cuts across
CUT_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
#: BraTS 2021 label -> RGB
LABEL_COLOURS = {1: (230, 40, 40), 2: (40, 200, 60), 4: (255, 215, 0)}
LABEL_NAMES = {1: "NCR necrotic core", 2: "ED oedema", 4: "ET enhancing tumour"}
#: which labels form each region (BraTS 2021 numbering)
REGION_LABELS = {"TC": (1, 4), "WT": (1, 2, 4), "ET": (4,)}
POSITIVE, NEGATIVE = np.array([225, 30, 20], np.float32), np.array([30, 110, 255], np.float32)
#: edge letters (left, right, top, bottom) of each view, radiological convention
EDGE_LETTERS = {"axial": "RLAP", "coronal": "RLSI", "sagittal": "APSI"}
#: longest side of the largest view, in pixels
DISPLAY_PIXELS = 384
CONTRIBUTION_SCALE = 127.0  # contributions in [-1, 1] stored as int8
#: label value -> RGB, as a lookup table
_LUT = np.zeros((256, 3), np.float32)
_LUT[list(LABEL_COLOURS)] = list(LABEL_COLOURS.values())
_FONT = ImageFont.load_default(size=15)


@dataclass(frozen=True)
class ViewSettings:
    """What the user chose to see."""

    background: str
    overlay: bool = True
    opacity: float = 0.45
    crosshair: bool = True
    region: str = "WT"
    contribution: str | None = None


class CaseViews:
    """A case's images, label map and contribution maps on the nearest-RAS grid."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        meta = np.load(self.folder / "meta.npz")
        self.zooms = tuple(float(z) for z in meta["zooms"])
        self.start = tuple(int(i) for i in meta["start"])
        self.sequences = tuple(str(s) for s in meta["sequences"])
        self.contributors = tuple(str(s) for s in meta["contributors"])
        #: the first voxel of the box the contribution maps are stored in
        self.box_start = tuple(int(i) for i in meta["box_start"])
        #: per contributor, per region: the colour scale's maximum |contribution|
        self.scale = {s: dict(zip(REGIONS, map(float, row))) for s, row in zip(self.contributors, meta["scale"])}
        self.labels = np.load(self.folder / "labels.npy", mmap_mode="r")
        self.images = {s: np.load(self.folder / f"image_{s}.npy", mmap_mode="r") for s in self.sequences}
        self.contributions = {s: np.load(self.folder / f"contribution_{s}.npy", mmap_mode="r") for s in self.contributors}

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.labels.shape)

    @classmethod
    def create(cls, folder: Path, images: dict[str, np.ndarray], labels: np.ndarray, affine: np.ndarray,
               contributions: dict[str, np.ndarray], box: tuple[slice, slice, slice] | None = None) -> CaseViews:
        """Store a case for viewing: ``images`` (3-D, by sequence) and ``labels`` on the
        grid of ``affine``; ``contributions`` ``[3, *shape]`` by sequence, zero outside
        ``box`` (default: the whole grid), where they are stored."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        orientation = io_orientation(affine)
        zooms = np.zeros(3)
        zooms[orientation[:, 0].astype(int)] = np.linalg.norm(affine[:3, :3], axis=0)

        def ras(volume: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(apply_orientation(volume, orientation))

        box = box or tuple(slice(0, n) for n in labels.shape)
        box_start = _ras_start(box, orientation, labels.shape)
        labels = ras(labels.astype(np.uint8))
        np.save(folder / "labels.npy", labels)
        for sequence, image in images.items():
            np.save(folder / f"image_{sequence}.npy", _window(ras(image)))
        scale = []
        for sequence, maps in contributions.items():
            maps = np.moveaxis(ras(np.moveaxis(maps[(slice(None), *box)], 0, -1)), -1, 0)
            scale.append([_colour_scale(m) for m in maps])
            np.save(folder / f"contribution_{sequence}.npy",
                    np.round(np.clip(maps, -1, 1) * CONTRIBUTION_SCALE).astype(np.int8))
        np.savez(folder / "meta.npz", zooms=zooms, start=_most_tumour(labels), sequences=list(images),
                 box_start=box_start, contributors=list(contributions), scale=np.asarray(scale, float).reshape(-1, len(REGIONS)))
        return cls(folder)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def render(self, position: tuple[int, int, int], settings: ViewSettings) -> list[np.ndarray]:
        """RGB images: the three segmentation views, then the three contribution views."""
        position = tuple(int(np.clip(p, 0, n - 1)) for p, n in zip(position, self.shape))
        scale = DISPLAY_PIXELS / max(n * z for n, z in zip(self.shape, self.zooms))
        segmentation, contribution = [], []
        for view in VIEWS:
            size = _display_size(view, self.shape, self.zooms, scale)
            background = _resize(_slice(self.images[settings.background], view, position), size, Image.BILINEAR)
            grey = np.repeat(background.astype(np.float32)[..., None], 3, axis=2)
            labels = _resize(_slice(self.labels, view, position), size, Image.NEAREST)
            image = grey.copy()
            if settings.overlay:
                painted = labels > 0
                image[painted] = (1 - settings.opacity) * image[painted] + settings.opacity * _LUT[labels[painted]]
            segmentation.append(self._finish(image, view, position, size, settings))
            contribution.append(self._finish(self._heat(grey, labels, view, position, size, settings),
                                             view, position, size, settings))
        return segmentation + contribution

    def _heat(self, grey: np.ndarray, labels: np.ndarray, view: str, position: tuple[int, int, int],
              size: tuple[int, int], settings: ViewSettings) -> np.ndarray:
        """The contribution of ``settings.contribution`` to ``settings.region``: red where
        the sequence raises the region's probability, blue where it lowers it; the
        predicted region outlined in white."""
        image = grey * 0.6  # dimmed, so that the colours stand out
        if settings.contribution not in self.contributions:
            return image
        r = REGIONS.index(settings.region)
        values = _boxed_slice(self.contributions[settings.contribution][r], self.box_start, self.shape, view,
                              position).astype(np.float32)
        values = _resize(values / CONTRIBUTION_SCALE, size, Image.BILINEAR)
        alpha = (np.clip(np.abs(values) / self.scale[settings.contribution][settings.region], 0, 1) * 0.85)[..., None]
        colour = np.where(values[..., None] >= 0, POSITIVE, NEGATIVE)
        image = (1 - alpha) * image + alpha * colour
        image[_outline(np.isin(labels, REGION_LABELS[settings.region]))] = 255
        return image

    def _finish(self, image: np.ndarray, view: str, position: tuple[int, int, int], size: tuple[int, int],
                settings: ViewSettings) -> np.ndarray:
        image = np.clip(image, 0, 255).astype(np.uint8)
        if settings.crosshair:
            column, row = _crosshair(view, position, self.shape, size)
            image[:, column] = (image[:, column] * 0.6 + 255 * 0.4).astype(np.uint8)
            image[row, :] = (image[row, :] * 0.6 + 255 * 0.4).astype(np.uint8)
        return _letters(image, EDGE_LETTERS[view])


def _window(image: np.ndarray) -> np.ndarray:
    """Intensities to 0..255 between the 0.5th and 99.5th percentiles of the non-zero voxels."""
    image = np.asarray(image, dtype=np.float32)
    inside = image[image != 0]
    if inside.size == 0:
        return np.zeros(image.shape, np.uint8)
    low, high = np.percentile(inside, (0.5, 99.5))
    if high <= low:
        high = low + 1
    return np.round(np.clip((image - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def _colour_scale(values: np.ndarray) -> float:
    """Full colour at the 99.5th percentile of |contribution| over the voxels that have one."""
    magnitude = np.abs(values[np.abs(values) > 1e-3])
    return max(float(np.percentile(magnitude, 99.5)) if magnitude.size else 0.0, 0.05)


def _most_tumour(labels: np.ndarray) -> list[int]:
    """Per axis, the slice with the most tumour (the middle one without tumour)."""
    tumour = labels > 0
    if not tumour.any():
        return [n // 2 for n in labels.shape]
    return [int(np.argmax(tumour.sum(axis=tuple(a for a in range(3) if a != axis)))) for axis in range(3)]


def _slice(volume: np.ndarray, view: str, position: tuple[int, int, int]) -> np.ndarray:
    """One slice of a RAS volume as displayed: rows top to bottom, columns left to right."""
    axis = CUT_AXIS[view]
    return _displayed(_cut(volume, axis, position[axis]))


def _boxed_slice(volume: np.ndarray, start: tuple[int, ...], shape: tuple[int, ...], view: str,
                 position: tuple[int, int, int]) -> np.ndarray:
    """As :func:`_slice`, for a volume of the grid ``shape`` stored only inside the box that
    starts at ``start`` (zero outside)."""
    axis = CUT_AXIS[view]
    others = [a for a in range(3) if a != axis]
    plane = np.zeros([shape[a] for a in others], volume.dtype)
    inside = position[axis] - start[axis]
    if 0 <= inside < volume.shape[axis]:
        plane[tuple(slice(start[a], start[a] + volume.shape[a]) for a in others)] = _cut(volume, axis, inside)
    return _displayed(plane)


def _cut(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The plane at ``index`` across ``axis`` (basic indexing: a memory map reads only it)."""
    return np.asarray(volume[(slice(None),) * axis + (index,)])


def _displayed(plane: np.ndarray) -> np.ndarray:
    """A RAS plane (the two remaining axes in order) as displayed: both flipped (right and
    anterior or superior first), then rows along the second axis."""
    return np.asarray(plane[::-1, ::-1]).T


def _ras_start(box: tuple[slice, ...], orientation: np.ndarray, shape: tuple[int, ...]) -> list[int]:
    """The first voxel of ``box`` (on the grid of ``shape``) once turned to RAS by ``orientation``."""
    start = [0, 0, 0]
    for axis, (target, flip) in enumerate(orientation.astype(int)):
        start[target] = box[axis].start if flip > 0 else shape[axis] - box[axis].stop
    return start


def _display_size(view: str, shape: tuple[int, ...], zooms: tuple[float, ...], scale: float) -> tuple[int, int]:
    """(width, height) in pixels: ``scale`` pixels per mm along both image axes."""
    columns, rows = {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}[view]
    return (max(1, round(shape[columns] * zooms[columns] * scale)), max(1, round(shape[rows] * zooms[rows] * scale)))


def _resize(image: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    if image.dtype == np.float32:
        return np.asarray(Image.fromarray(image, mode="F").resize(size, resample))
    return np.asarray(Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).resize(size, resample))


def _crosshair(view: str, position: tuple[int, int, int], shape: tuple[int, ...],
               size: tuple[int, int]) -> tuple[int, int]:
    """The display column and row where the other two views cut this one."""
    i, j, k = position
    column_index, column_axis, row_index, row_axis = {
        "axial": (i, 0, j, 1), "coronal": (i, 0, k, 2), "sagittal": (j, 1, k, 2),
    }[view]
    column = int((shape[column_axis] - 1 - column_index + 0.5) / shape[column_axis] * size[0])
    row = int((shape[row_axis] - 1 - row_index + 0.5) / shape[row_axis] * size[1])
    return min(column, size[0] - 1), min(row, size[1] - 1)


def _outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` with a 4-neighbour outside it."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _letters(image: np.ndarray, letters: str) -> np.ndarray:
    """The patient directions on the left, right, top and bottom edges."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    places = (((4, height / 2), "lm"), ((width - 4, height / 2), "rm"), ((width / 2, 3), "mt"), ((width / 2, height - 3), "mb"))
    for letter, (xy, anchor) in zip(letters, places):
        draw.text(xy, letter, fill=(255, 255, 255), font=_FONT, anchor=anchor, stroke_width=2, stroke_fill=(0, 0, 0))
    return np.asarray(canvas)
