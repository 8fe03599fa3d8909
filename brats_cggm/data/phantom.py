"""Phantom BraTS cases: the project's embedded default data.

Every case starts from a real brain, the MNI152 2009 template that ``nilearn`` ships
(grey- and white-matter probability maps; CSF is the rest of its brain mask), randomly
scaled, rotated, shifted and elastically deformed. One glioma, sometimes two, grows in the
white matter and pushes the tissue aside: an irregular necrotic core (label 1) inside an
enhancing rim (4) inside oedema (2) that spreads along the white matter and thins out
towards its edge; about one lesion in seven has no enhancing tumour and one in ten no
necrosis, as in real BraTS. Each sequence sees the tissues with its own contrast
(:data:`CONTRAST`, drawn per case around it), so each carries different, partial
information: enhancement only on T1ce, oedema bright on FLAIR and T2, CSF bright on T2 but
dark on FLAIR, necrosis dark on T1/T1ce and bright on FLAIR/T2. A fine tissue texture,
Rician noise, a smooth bias field per sequence and a per-case intensity scale finish it;
the background outside the brain is exactly 0, as in skull-stripped BraTS.

Calibration. Contrasts, their spread from case to case, texture, noise, bias field, brain
size and tumour shapes are set so that ``bench/phantom_vs_real.py`` measures on phantoms
what it measures on real labelled BraTS 2018 cases (:data:`CALIBRATION`; the side-by-side
table is in docs/data.md). Before that, phantoms were far easier than real scans: in brain
standard deviations, enhancement stood 5 above T1 on T1ce instead of 2, noise was twice the
real one, and the oedema was a uniform bright shell around a small core.

Geometry. The field of view is always 240 x 240 x 155 mm, on BraTS's (SRI24) axes: the
array runs along -x, -y, +z of RAS, so the affine is ``diag(-sx, -sy, sz)`` with an origin
near BraTS's ``(0, 239, 0)``, jittered by a few mm per case. The default grid samples it at
exactly 1 mm (240 x 240 x 155 voxels); any other grid samples the same field of view, so
its spacing is ``240/nx x 240/ny x 155/nz`` mm (64^3: 3.75 x 3.75 x 2.42 mm) and the
whole brain stays visible. All random choices except the noise and the fine texture are
made in millimetres, so one seed gives the same brain and tumour at every grid size (up to
resolution).

Time per case, one thread on a 2-core machine shared with another job: 1.6-1.7 s at
240 x 240 x 155 (peak memory about 0.6 GB), 0.05 s at 64^3 and 0.17 s at 96 x 128 x 80
(the calibration's texture and oedema density cost up to 10 % at 1 mm); under heavier load
3.3-4 s, 0.15-0.3 s and 0.2-0.5 s. Writing the gzip'd NIfTI files adds about 1 s per
full-size case. Once per process: 0.7-1 s to load the template, and 0.5 s to blur it for
each grid coarser than 1 mm.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from brats_cggm import MODALITIES
from brats_cggm.data.labels import to_scheme
from brats_cggm.data.layouts import LAYOUTS
from brats_cggm.errors import ConfigurationError
from multimodal_general.io import atomic_write, atomic_write_text

DEFAULT_SIZE = (240, 240, 155)
FIELD_OF_VIEW_MM = np.array([240.0, 240.0, 155.0])
#: array axes -> RAS directions, as in BraTS files
AXES_TO_RAS = np.diag([-1.0, -1.0, 1.0])

NCR, ED, ET = 1, 2, 4
#: median intensity of each tissue relative to normal white matter, per sequence, calibrated
#: on real BraTS 2018 cases (docs/data.md): see :data:`CALIBRATION`
CONTRAST = {
    "flair": {"csf": 0.33, "gm": 0.99, "wm": 1.0, "ed": 1.63, "ncr": 1.65, "et": 1.61},
    "t1": {"csf": 0.45, "gm": 0.78, "wm": 1.0, "ed": 0.79, "ncr": 0.65, "et": 0.76},
    "t1ce": {"csf": 0.55, "gm": 0.88, "wm": 1.0, "ed": 0.83, "ncr": 0.72, "et": 1.19},
    "t2": {"csf": 2.65, "gm": 1.03, "wm": 1.0, "ed": 1.71, "ncr": 2.22, "et": 1.71},
}
#: case-to-case standard deviation of each :data:`CONTRAST` value (a case draws each one
#: from a normal distribution clipped at two standard deviations)
CONTRAST_SPREAD = {
    "flair": {"csf": 0.14, "gm": 0.01, "wm": 0.0, "ed": 0.19, "ncr": 0.2, "et": 0.25},
    "t1": {"csf": 0.05, "gm": 0.035, "wm": 0.0, "ed": 0.06, "ncr": 0.06, "et": 0.07},
    "t1ce": {"csf": 0.085, "gm": 0.015, "wm": 0.0, "ed": 0.065, "ncr": 0.055, "et": 0.1},
    "t2": {"csf": 0.16, "gm": 0.01, "wm": 0.0, "ed": 0.2, "ncr": 0.29, "et": 0.22},
}
#: fine texture of the tissue (vessels, small structures, partial volumes: what makes real
#: white matter vary by 5-12 % at the scale of a few mm), as a fraction of the intensity:
#: one pattern, signed per sequence (water-rich spots bright on FLAIR/T2, dark on T1)
GRAIN = {"flair": 0.12, "t1": -0.06, "t1ce": -0.09, "t2": 0.12}
GRAIN_MM = 4.0
#: Rician noise sigma relative to the median brain intensity (range over cases), per sequence
NOISE = {
    "flair": (0.013, 0.032), "t1": (0.004, 0.010), "t1ce": (0.007, 0.017), "t2": (0.009, 0.023)
}
#: standard deviation of the log bias field (range over cases), per sequence
BIAS = {"flair": (0.034, 0.1), "t1": (0.044, 0.13), "t1ce": (0.02, 0.06), "t2": (0.052, 0.155)}
#: the brain's linear size relative to the MNI152 template (range over cases)
BRAIN_SCALE = (0.82, 0.96)
#: tumour shape: whole-tumour semi-axes (mm), tumour core and necrosis as fractions of the
#: enclosing region, the least oedema around the core (in core radii: real oedema borders
#: about two thirds of the core's surface), the density of the oedema at its outer edge (1
#: next to the core)
WT_RADIUS_MM = (16.0, 36.0)
CORE_FRACTION = (0.65, 1.05)
NECROSIS_FRACTION = (0.65, 0.92)
OEDEMA_WRAP = 1.02
OEDEMA_EDGE = 0.5
#: chance that a lesion enhances, that a case has two lesions
ENHANCING = 0.85
TWO_LESIONS = 0.15
#: what the intensities are calibrated to: means over the 12 labelled BraTS 2018 cases of
#: ../shared/data/real, measured by bench/phantom_vs_real.py (``gap/<key>``), in z-scores of
#: each sequence over its brain: enhancing tumour on T1ce minus on T1, oedema on FLAIR, CSF
#: on T2 minus on FLAIR, each relative to the normal brain's median. Between cases they
#: vary by about 0.7 (real and phantom alike).
CALIBRATION = {"et_t1ce_minus_t1": 2.00, "ed_flair": 1.97, "csf_t2_minus_flair": 4.05}
#: the dominant normal tissue in :attr:`PhantomCase.tissue`
TISSUE_CODES = {"background": 0, "csf": 1, "gm": 2, "wm": 3}

MSD_CHANNELS = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}  # canonical order, as in Task01
MSD_LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}


@dataclass(frozen=True)
class PhantomCase:
    """One phantom case on a ``size`` grid.

    ``images``: sequence (``MODALITIES``) -> float32 intensities, whole numbers >= 0 and
    exactly 0 outside the brain. ``label``: uint8, BraTS 2021 numbering (1 NCR, 2 ED,
    4 ET). ``affine``: 4x4 voxel -> RAS mm. ``tissue``: uint8, the dominant normal tissue
    of each voxel (:data:`TISSUE_CODES`; under the tumour, the tissue it replaced), a ground
    truth for checks that is never written to disk.
    """

    images: dict[str, np.ndarray]
    label: np.ndarray
    affine: np.ndarray
    tissue: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def generate_case(seed: int, size: int | str | Sequence[int] = DEFAULT_SIZE) -> PhantomCase:
    """A phantom case, the same for the same ``seed`` (and, but for the noise, at any size)."""
    size = grid_size(size)
    spacing = FIELD_OF_VIEW_MM / size
    geometry_rng, tumour_rng, intensity_rng, noise_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )
    anatomy = _anatomy(tuple(np.round(spacing, 3)))
    placement = _Placement.random(geometry_rng, anatomy)
    lesions = _Lesion.random_set(tumour_rng, anatomy, placement)
    axes = [(np.arange(n) + 0.5) * s - f / 2 for n, s, f in zip(size, spacing, FIELD_OF_VIEW_MM)]

    box = placement.brain_box(anatomy, axes, spacing)
    box_axes = [a[b] for a, b in zip(axes, box)]
    positions = placement.deformed(box_axes)
    for lesion in lesions:
        lesion.push_aside(positions, box_axes)
    csf, gm, wm = _sample_tissues(anatomy, placement.to_template(positions), spacing)
    del positions
    inside = (csf + gm + wm) >= 0.5
    label = np.zeros(inside.shape, np.uint8)
    texture = np.zeros(inside.shape, np.float32)
    density = np.zeros(inside.shape, np.float32)
    for lesion in lesions:
        lesion.paint(label, texture, density, box_axes, inside, wm, csf)

    fractions = {"csf": csf, "gm": gm, "wm": wm, **_tumour_weights(label, density, spacing)}
    contrast = _case_contrast(intensity_rng)
    grain = _grain(noise_rng, inside.shape, spacing)
    images = {}
    for modality in MODALITIES:
        image = _mix(fractions, contrast[modality], texture)
        image *= 1 + GRAIN[modality] * grain
        image *= _intensity_scale(intensity_rng, box_axes, BIAS[modality])
        images[modality] = _finish(image, inside, NOISE[modality], noise_rng, intensity_rng)
    tissue = (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1) * inside  # TISSUE_CODES order
    return PhantomCase(
        images={m: _paste(v, box, size, np.float32) for m, v in images.items()},
        label=_paste(label, box, size, np.uint8),
        affine=placement.affine(spacing),
        tissue=_paste(tissue, box, size, np.uint8),
    )


def grid_size(size: int | str | Sequence[int]) -> np.ndarray:
    """``size`` as three grid dimensions (one number is a cube; text such as ``"64"`` or
    ``"96x128x80"`` too, for command lines); an error for bad ones."""
    if isinstance(size, str):
        text = size.strip().lower()
        words = re.split(r"[x,\s]+", text) if text else []
        size = [int(w) if w.isdigit() else -1 for w in words]
    dims = np.atleast_1d(np.asarray(size))
    if dims.shape == (1,):
        dims = np.repeat(dims, 3)
    ok = dims.shape == (3,) and dims.dtype.kind in "iuf" and np.all(dims == np.round(dims))
    if not ok or not np.all((dims >= 16) & (dims <= 512)):
        raise ConfigurationError(
            f"phantom size must be one or three whole numbers in 16..512, not {size}"
        )
    return dims.astype(int)


# --- anatomy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Anatomy:
    """The template's tissue maps (uint8, 255 = 1), on its 1 mm RAS grid."""

    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray
    #: template voxel at the centre of the brain's bounding box, and the brain's top slice
    centre: np.ndarray
    top: float
    #: template voxels where a glioma may start: deep cerebral white matter
    seeds: np.ndarray


@functools.lru_cache(maxsize=4)
def _anatomy(spacing: tuple[float, float, float]) -> _Anatomy:
    """The template for a grid of this spacing: blurred when coarser than 1 mm, so that it
    is sampled without aliasing and with partial volumes, as a real scan at that resolution."""
    fine = _template_anatomy()
    if all(s <= 1 for s in spacing):
        return fine
    sigma = [0.4 * np.sqrt(max(s**2 - 1, 0)) for s in spacing]  # the template has 1 mm voxels
    gm, wm, brain = (ndimage.gaussian_filter(m, sigma) for m in (fine.gm, fine.wm, fine.brain))
    return _Anatomy(gm, wm, brain, fine.centre, fine.top, fine.seeds)


@functools.lru_cache(maxsize=1)
def _template_anatomy() -> _Anatomy:
    t1, gm, wm = (_template(name) for name in ("t1", "gm", "wm"))
    brain = np.where(t1 > 0.2 * t1.max(), 255, 0).astype(np.uint8)  # nilearn's brain mask
    gm, wm = (np.minimum(_to_uint8(m), brain) for m in (gm, wm))
    corners = np.argwhere(brain)
    low, high = corners.min(0), corners.max(0)
    step = 3  # a coarse distance map is plenty to keep seeds away from the surface
    depth = ndimage.distance_transform_edt(brain[::step, ::step, ::step]) * step
    seeds = np.argwhere(
        (wm > 230) & (np.arange(brain.shape[2]) > low[2] + 0.4 * (high[2] - low[2]))
    )
    seeds = seeds[depth[tuple((seeds // step).T)] > 18]
    return _Anatomy(gm, wm, brain, (low + high) / 2, float(high[2]), seeds)


def _template(name: str) -> np.ndarray:
    """A MNI152 map from nilearn's package data, read directly: importing
    ``nilearn.datasets`` costs seconds (scikit-learn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise ConfigurationError(
            "the phantom generator needs nilearn's MNI152 template: pip install nilearn"
        )
    path = (
        Path(spec.origin).parent
        / "datasets"
        / "data"
        / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"
    )
    if not path.is_file():
        from nilearn import datasets

        image = getattr(
            datasets, "load_mni152_template" if name == "t1" else f"load_mni152_{name}_template"
        )(resolution=1)
    else:
        image = nib.load(path)
    if not np.allclose(image.affine[:3, :3], np.eye(3)):
        raise ConfigurationError(
            f"unexpected MNI152 {name} template grid in nilearn {image.affine.tolist()}"
        )
    return np.asarray(image.dataobj)


def _to_uint8(volume: np.ndarray) -> np.ndarray:
    return np.round(volume.astype(np.float32) * (255 / volume.max())).astype(np.uint8)


def _sample_tissues(
    anatomy: _Anatomy, coords: np.ndarray, spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSF, GM, WM fractions at template voxel ``coords`` (trilinear), computed only near
    the brain (found on a ~4 mm subgrid), which halves the time."""
    step = np.maximum(1, np.round(4 / spacing).astype(int))
    coarse = coords[(slice(None), *(slice(None, None, s) for s in step))]
    near = ndimage.map_coordinates(anatomy.brain, coarse, order=0) > 0
    near = ndimage.binary_dilation(near, iterations=2)
    near = near[np.ix_(*(np.arange(n) // s for n, s in zip(coords.shape[1:], step)))]
    points = coords[:, near]
    fractions = []
    for volume in (anatomy.brain, anatomy.gm, anatomy.wm):
        fraction = np.zeros(near.shape, np.float32)
        fraction[near] = ndimage.map_coordinates(
            volume, points, order=1, output=np.float32
        ) / np.float32(255)
        fractions.append(fraction)
    brain, gm, wm = fractions
    return np.maximum(brain - gm - wm, 0), gm, wm


# --- geometry ----------------------------------------------------------------------------


class _SmoothField:
    """A smooth random field of unit variance: Gaussian bumps ``exp(-d^2 / h^2)`` with
    random weights on a lattice of spacing ``h`` mm over ``[low, high]``. Its draws depend
    on the box only, so the field is the same on every grid that samples it."""

    def __init__(
        self, rng: np.random.Generator, low: Sequence[float], high: Sequence[float], h: float
    ) -> None:
        self.nodes = [np.arange(lo - 2 * h, hi + 2 * h + h / 2, h) for lo, hi in zip(low, high)]
        self.weights = rng.standard_normal([len(n) for n in self.nodes])
        self.h = h

    def __call__(self, axes: Sequence[np.ndarray]) -> np.ndarray:
        """The field on the grid ``axes`` (three 1-D arrays of mm), computed separably."""
        field = self.weights.astype(np.float32) / np.float32(
            (np.pi / 2) ** 0.75
        )  # sum of squared bumps
        for nodes, x in zip(self.nodes, axes):  # is sqrt(pi/2) per axis
            basis = np.exp(-(((x[:, None] - nodes[None, :]) / self.h) ** 2)).astype(np.float32)
            field = np.tensordot(field, basis, axes=([0], [1]))
        return field


def _rotation(angles: Sequence[float]) -> np.ndarray:
    """Rotation about x, then y, then z (radians)."""
    result = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        result = r @ result
    return result


@dataclass(frozen=True)
class _Placement:
    """Where the template brain lies in the field of view. Positions in the field of view
    are mm from its centre along the array axes; ``template = matrix @ (x + elastic(x)) + offset``."""

    matrix: np.ndarray
    offset: np.ndarray
    elastic: tuple[_SmoothField, ...]
    elastic_mm: float
    origin_jitter: np.ndarray

    @classmethod
    def random(cls, rng: np.random.Generator, anatomy: _Anatomy) -> _Placement:
        rotation = _rotation(np.radians(rng.uniform(-1, 1, 3) * (8, 6, 10)))
        # the brain's size relative to MNI152, whose mask (~1.75 l) is larger than a
        # skull-stripped BraTS brain (1.44 +- 0.18 l, bench/phantom_vs_real.py)
        size = rng.uniform(*BRAIN_SCALE) * rng.uniform(0.96, 1.04, 3)
        matrix = rotation @ np.diag(1 / size) @ AXES_TO_RAS
        top_margin = rng.uniform(3, 12)  # mm between the top of the brain and of the field of view
        centre = np.array([0, 0, FIELD_OF_VIEW_MM[2] / 2 - top_margin]) + rng.uniform(-1, 1, 3) * (
            6,
            6,
            2,
        )
        target = np.array([*anatomy.centre[:2], anatomy.top])
        offset = target - matrix @ centre
        half = FIELD_OF_VIEW_MM / 2
        elastic = tuple(_SmoothField(rng, -half, half, 40.0) for _ in range(3))
        return cls(matrix, offset, elastic, rng.uniform(1.5, 3.5), rng.uniform(-4, 4, 3))

    def deformed(self, axes: Sequence[np.ndarray]) -> np.ndarray:
        """``x + elastic(x)`` on the grid ``axes``: ``[3, *grid]`` mm."""
        return np.stack(
            [
                self.elastic_mm * field(axes) + _along(a, i, 3)
                for i, (field, a) in enumerate(zip(self.elastic, axes))
            ]
        )

    def to_template(self, positions: np.ndarray) -> np.ndarray:
        coords = np.tensordot(self.matrix.astype(np.float32), positions, axes=1)
        coords += self.offset.astype(np.float32).reshape(3, 1, 1, 1)
        return coords

    def brain_box(
        self, anatomy: _Anatomy, axes: Sequence[np.ndarray], spacing: np.ndarray
    ) -> tuple[slice, ...]:
        """The part of the grid that the brain may cover (found every ~6 mm, plus a margin
        for the mass effect)."""
        step = np.maximum(1, (6 / spacing).astype(int))
        coarse = [a[::s] for a, s in zip(axes, step)]
        found = np.argwhere(
            ndimage.map_coordinates(anatomy.brain, self.to_template(self.deformed(coarse)), order=0)
        )
        margin = step + np.ceil(15 / spacing).astype(int)
        low, high = found.min(0) * step - margin, found.max(0) * step + margin + 1
        return tuple(slice(max(0, lo), min(len(a), hi)) for a, lo, hi in zip(axes, low, high))

    def field_of_view_position(self, template_voxel: np.ndarray) -> np.ndarray:
        """Where a template voxel lies in the field of view (ignoring the elastic part)."""
        return np.linalg.solve(self.matrix, template_voxel - self.offset)

    def affine(self, spacing: np.ndarray) -> np.ndarray:
        """BraTS's geometry: voxel (i, j, k) of the 1 mm grid at RAS (-i, 239 - j, k), plus jitter;
        other grids cover the same field of view."""
        affine = np.eye(4)
        affine[:3, :3] = AXES_TO_RAS @ np.diag(spacing)
        first_voxel_centre = (
            spacing / 2 - FIELD_OF_VIEW_MM / 2
        )  # mm from the centre, along the array axes
        centre_ras = np.array([-119.5, 119.5, 77.0])  # the field of view's centre in BraTS files
        affine[:3, 3] = centre_ras + AXES_TO_RAS @ first_voxel_centre + self.origin_jitter
        return affine


def _along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return values.astype(np.float32).reshape(shape)


# --- tumours ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Lesion:
    """One glioma around ``centre`` (mm in the field of view): ellipsoids of semi-axes
    ``radii`` (whole tumour), ``radii * core`` (tumour core) and ``radii * core * necrosis``
    (necrosis), made irregular by smooth noise."""

    centre: np.ndarray
    rotation: np.ndarray
    radii: np.ndarray
    core: np.ndarray
    necrosis: float
    enhancing: bool
    push: float
    shape_noise: tuple[_SmoothField, ...]
    texture: _SmoothField

    @classmethod
    def random_set(
        cls, rng: np.random.Generator, anatomy: _Anatomy, placement: _Placement
    ) -> list[_Lesion]:
        count = 2 if rng.random() < TWO_LESIONS else 1
        lesions = [cls.random(rng, anatomy, placement, scale=1.0)]
        if count == 2:
            lesions.append(cls.random(rng, anatomy, placement, scale=rng.uniform(0.5, 0.8)))
        return lesions

    @classmethod
    def random(
        cls, rng: np.random.Generator, anatomy: _Anatomy, placement: _Placement, scale: float
    ) -> _Lesion:
        limit = FIELD_OF_VIEW_MM / 2 - 25
        for _ in range(100):  # deep white matter that lies well inside the field of view
            centre = placement.field_of_view_position(
                anatomy.seeds[rng.integers(len(anatomy.seeds))]
            )
            if np.all(np.abs(centre) < limit):
                break
        radii = scale * rng.uniform(*WT_RADIUS_MM) * rng.uniform(0.8, 1.2, 3)
        low, high = centre - _reach(radii), centre + _reach(radii)
        return cls(
            centre=centre,
            rotation=_rotation(rng.uniform(-np.pi, np.pi, 3)),
            radii=radii,
            core=rng.uniform(*CORE_FRACTION) * rng.uniform(0.85, 1.15, 3),
            necrosis=rng.uniform(*NECROSIS_FRACTION) if rng.random() < 0.9 else 0.0,
            enhancing=rng.random() < ENHANCING,
            push=rng.uniform(0.15, 0.5),
            shape_noise=tuple(_SmoothField(rng, low, high, h) for h in (10.0, 6.0, 5.0)),
            texture=_SmoothField(rng, low, high, 3.0),
        )

    def _region(self, axes: Sequence[np.ndarray], extent: float) -> tuple[slice, ...] | None:
        """The part of the grid ``axes`` within ``extent`` mm of the centre (a box)."""
        region = []
        for a, c in zip(axes, self.centre):
            inside = np.flatnonzero(np.abs(a - c) <= extent)
            if not len(inside):
                return None
            region.append(slice(inside[0], inside[-1] + 1))
        return tuple(region)

    def push_aside(self, positions: np.ndarray, axes: Sequence[np.ndarray]) -> None:
        """Mass effect: sample the tissue closer to the centre, so that it bulges outwards
        (a smooth pull that vanishes, with its derivative, at 3 core radii)."""
        extent = 3 * float(self.radii.mean() * self.core.mean())
        region = self._region(axes, extent)
        if region is None:
            return
        offsets = [
            _along(a[r] - c, i, 3) for i, (a, r, c) in enumerate(zip(axes, region, self.centre))
        ]
        closeness = np.maximum(1 - sum(o**2 for o in offsets) / extent**2, 0)
        pull = self.push * closeness**2
        for i, o in enumerate(offsets):
            positions[(i, *region)] -= pull * o

    def paint(
        self,
        label: np.ndarray,
        texture: np.ndarray,
        density: np.ndarray,
        axes: Sequence[np.ndarray],
        inside: np.ndarray,
        wm: np.ndarray,
        csf: np.ndarray,
    ) -> None:
        """Add this lesion to ``label`` (BraTS 2021 values), its texture to ``texture`` and
        how dense its oedema is (1 at the core, :data:`OEDEMA_EDGE` at the edge) to ``density``."""
        region = self._region(axes, _reach(self.radii))
        if region is None:
            return
        sub_axes = [a[r] for a, r in zip(axes, region)]
        offsets = [_along(a - c, i, 3) for i, (a, c) in enumerate(zip(sub_axes, self.centre))]
        local = [sum(self.rotation[i, k] * offsets[i] for i in range(3)) for k in range(3)]

        def distance(radii: np.ndarray) -> np.ndarray:
            return np.sqrt(sum((u / r) ** 2 for u, r in zip(local, radii)))

        # noise clipped at 2 sd keeps every shape within _reach
        wt_noise, tc_noise, ncr_noise = (np.clip(f(sub_axes), -2, 2) for f in self.shape_noise)
        brain, wm = inside[region], wm[region]
        # oedema spreads along the white matter, not into the CSF spaces
        core_distance = distance(self.radii * self.core) + 0.2 * tc_noise
        core = (core_distance < 1) & brain
        wt_distance = distance(self.radii) + 0.25 * wt_noise - 0.4 * (wm - 0.5)
        whole = (wt_distance < 1) & (csf[region] < 0.5)
        whole = (whole | (core_distance < OEDEMA_WRAP)) & brain  # oedema wraps most of the core
        whole = _connected_to(whole, core) if core.any() else whole
        sub = label[region]
        sub[whole & (sub == 0)] = ED
        sub[core] = ET if self.enhancing else NCR
        if self.necrosis:
            necrotic = distance(self.radii * self.core * self.necrosis) + 0.3 * ncr_noise < 1
            sub[necrotic & ndimage.binary_erosion(core)] = NCR  # inside a rim of at least one voxel
        texture[region] += np.where(core, 0.06, np.where(whole, 0.05, 0)) * self.texture(sub_axes)
        # real oedema fades into the normal tissue: from dense next to the core to a thin mix
        fade = np.clip((1 - wt_distance) / (1 - float(self.core.mean())), 0, 1)
        dense = whole * (OEDEMA_EDGE + (1 - OEDEMA_EDGE) * fade)
        np.maximum(density[region], dense, out=density[region])


def _connected_to(mask: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """The parts of ``mask`` that touch ``seed``."""
    parts, _ = ndimage.label(mask)
    return np.isin(parts, np.unique(parts[seed & mask]))


def _reach(radii: np.ndarray) -> float:
    """How far from its centre a lesion may extend, in mm (at most 1.7 ``radii``: see paint)."""
    return float(radii.max() * 1.6 + 6)


def _tumour_weights(
    label: np.ndarray, density: np.ndarray, spacing: np.ndarray
) -> dict[str, np.ndarray]:
    """Fractions of oedema, necrosis and enhancing tumour per voxel: the label's classes
    (oedema times its ``density``), blurred by ~1 mm so that boundaries are soft, as in real
    images."""
    weights = {name: np.zeros(label.shape, np.float32) for name in ("ed", "ncr", "et")}
    found = np.argwhere(label)
    if not len(found):
        return weights
    sigma = (
        np.sqrt(0.8**2 + (0.4 * spacing) ** 2) / spacing
    )  # ~1 mm blur plus the voxel's partial volume
    pad = np.ceil(3 * sigma).astype(int)
    region = tuple(
        slice(max(0, lo - p), min(n, hi + p + 1))
        for lo, hi, p, n in zip(found.min(0), found.max(0), pad, label.shape)
    )
    for name, value in (("ed", ED), ("ncr", NCR), ("et", ET)):
        present = (label[region] == value).astype(np.float32)
        if value == ED:
            present *= density[region]
        weights[name][region] = ndimage.gaussian_filter(present, sigma)
    return weights


# --- intensities -------------------------------------------------------------------------


def _mix(
    fractions: dict[str, np.ndarray], contrast: dict[str, float], texture: np.ndarray
) -> np.ndarray:
    """The noiseless image: normal tissues where the tumour leaves room, plus the tumour."""
    tumour = fractions["ed"] + fractions["ncr"] + fractions["et"]
    image = sum(contrast[t] * fractions[t] for t in ("csf", "gm", "wm")) * (1 - tumour)
    image += sum(contrast[t] * fractions[t] for t in ("ed", "ncr", "et")) * (1 + texture)
    return image


def _case_contrast(rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """This case's :data:`CONTRAST`: each value drawn around the table's
    (:data:`CONTRAST_SPREAD`; white matter, the reference, stays 1), as real cases differ in
    tumour biology, scanner and protocol."""
    return {
        m: {
            t: value + CONTRAST_SPREAD[m][t] * float(np.clip(rng.standard_normal(), -2, 2))
            for t, value in table.items()
        }
        for m, table in CONTRAST.items()
    }


def _grain(rng: np.random.Generator, shape: tuple[int, ...], spacing: np.ndarray) -> np.ndarray:
    """Unit-variance texture of :data:`GRAIN_MM` correlation length: white noise, blurred.
    Drawn per voxel, like the noise (so, unlike the anatomy, it depends on the grid), which
    costs a fraction of a second where a smooth field in millimetres would cost seconds."""
    white = rng.standard_normal(shape, dtype=np.float32)
    grain = ndimage.gaussian_filter(white, GRAIN_MM / spacing)
    grain /= grain.std()
    return grain


def _intensity_scale(
    rng: np.random.Generator, axes: Sequence[np.ndarray], bias_range: tuple[float, float]
) -> np.ndarray:
    """Per-sequence scale (white matter at 300..1500) times a smooth bias field whose log
    has a standard deviation in ``bias_range``."""
    level = rng.uniform(300, 1500)
    bias = _SmoothField(rng, -FIELD_OF_VIEW_MM / 2, FIELD_OF_VIEW_MM / 2, 90.0)
    return level * np.exp(rng.uniform(*bias_range) * bias(axes))


def _finish(
    image: np.ndarray,
    inside: np.ndarray,
    noise: tuple[float, float],
    noise_rng: np.random.Generator,
    rng: np.random.Generator,
) -> np.ndarray:
    """Rician noise (the magnitude of a complex signal with Gaussian noise), rounded to
    whole numbers in int16 range; 0 outside the brain."""
    signal = image[inside]
    sigma = np.float32(rng.uniform(*noise) * np.median(signal))
    real = signal + sigma * noise_rng.standard_normal(signal.shape, dtype=np.float32)
    imaginary = sigma * noise_rng.standard_normal(signal.shape, dtype=np.float32)
    result = np.zeros(image.shape, np.float32)
    result[inside] = np.clip(np.round(np.hypot(real, imaginary)), 0, 32767)
    return result


def _paste(values: np.ndarray, box: tuple[slice, ...], size: np.ndarray, dtype: type) -> np.ndarray:
    full = np.zeros(tuple(size), dtype)
    full[box] = values
    return full


# --- files -------------------------------------------------------------------------------


def write_phantoms(
    out: str | Path,
    cases: int,
    size: int | str | Sequence[int] = DEFAULT_SIZE,
    layout: str = "brats2021",
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write ``cases`` phantom cases under ``out`` in ``layout``; return their folders
    (``brats2021``, ``brats2023``) or image files (``msd``, plus ``dataset.json``).

    Case ``i`` is ``generate_case(case_seed(seed, i), size)``. Images are int16 in the
    per-sequence layouts, one float32 4-D file (channels in canonical order) in ``msd``;
    labels are uint8 in the layout's numbering. Every file is written atomically (an
    existing ``dataset.json`` is replaced); ``progress(done, total)`` is called after each
    case.
    """
    if layout not in LAYOUTS:
        raise ConfigurationError(f"unknown layout '{layout}'; choose one of {sorted(LAYOUTS)}")
    if cases < 1:
        raise ConfigurationError(f"the number of phantom cases must be at least 1, not {cases}")
    size = grid_size(size)
    out = Path(out)
    written = []
    for index in range(cases):
        case = generate_case(case_seed(seed, index), size)
        if layout == "msd":
            written.append(_write_msd_case(out, index + 1, case))
        else:
            written.append(_write_brats_case(out, index, case, layout))
        if progress is not None:
            progress(index + 1, cases)
    if layout == "msd":
        _write_msd_manifest(out, written)
    return written


def case_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` in a set of phantoms made with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1)[0])


def _write_brats_case(out: Path, index: int, case: PhantomCase, layout: str) -> Path:
    case_id = f"BraTS2021_{index:05d}" if layout == "brats2021" else f"BraTS-GLI-{index:05d}-000"
    folder = out / case_id
    spec = LAYOUTS[layout]
    for modality in MODALITIES:
        _write_nifti(
            folder / spec.file_name(case_id, modality),
            case.images[modality].astype(np.int16),
            case.affine,
        )
    _write_nifti(
        folder / spec.file_name(case_id, "seg"),
        to_scheme(case.label, spec.label_scheme),
        case.affine,
    )
    return folder


def _write_msd_case(out: Path, number: int, case: PhantomCase) -> Path:
    name = f"BRATS_{number:03d}.nii.gz"
    image = np.stack(
        [case.images[m] for m in MODALITIES], axis=-1
    )  # Task01's channel order is canonical
    _write_nifti(out / "labelsTr" / name, to_scheme(case.label, "msd"), case.affine)
    return _write_nifti(out / "imagesTr" / name, image, case.affine)


def _write_msd_manifest(out: Path, images: list[Path]) -> None:
    manifest = {
        "name": "BRATS",
        "description": "Phantom gliomas (brats-cggm phantom) in the layout of MSD Task01_BrainTumour",
        "tensorImageSize": "4D",
        "modality": MSD_CHANNELS,
        "labels": MSD_LABELS,
        "numTraining": len(images),
        "numTest": 0,
        "training": [
            {"image": f"./imagesTr/{p.name}", "label": f"./labelsTr/{p.name}"} for p in images
        ],
        "test": [],
    }
    atomic_write_text(out / "dataset.json", json.dumps(manifest, indent=4) + "\n")


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """A gzip'd NIfTI-1 file with the header fields of real BraTS files (scanner qform and
    sform, mm units), written atomically and byte-for-byte reproducibly."""
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    payload = gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)
    return atomic_write(path, lambda handle: handle.write(payload))
