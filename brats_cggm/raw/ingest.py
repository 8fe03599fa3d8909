"""A raw examination -> a BraTS-ready case: the four sequences co-registered in MNI152 space
at 1 mm, skull-stripped, in the layout ``brats-cggm check`` accepts, with ``ingest.json``
recording how (source series, the identification table, every transform and its metric, the
brain volume) and no patient identifier.

Per case: read and check the series (series.py), identify the sequences (identify.py),
register FLAIR, T1 and T2 to the T1ce (the reference; without a T1ce, the first of T1, FLAIR,
T2), extract the brain (brain.py: deepbet on the T1, else the T1ce; images already
skull-stripped pass through, their non-zero voxels are the brain), register the reference's
brain to the atlas, then resample every sequence once, through its composed transform, onto
the atlas grid. The case is written to a hidden folder and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brats_cggm import MODALITIES
from brats_cggm.errors import InconsistentCase
from brats_cggm.raw import brain, register
from brats_cggm.raw.grids import affine_of, ras_grid, to_xyz
from brats_cggm.raw.identify import identify
from brats_cggm.raw.series import Series, check_one_examination, find_series

#: the reference sequence, in order of preference
REFERENCE_ORDER = ("t1ce", "t1", "flair", "t2")
#: plausible adult brain volumes (ml): outside, the brain mask is refused
BRAIN_ML = (700.0, 2300.0)
#: an image is taken as skull-stripped when at least this share of its voxels is exactly 0
STRIPPED_ZERO_SHARE = 0.3
#: and its non-zero voxels hold at most this volume (ml): a head with skull holds 3-5 litres
STRIPPED_MAX_ML = 2500.0
INGEST_JSON = "ingest.json"


@dataclass
class IngestedCase:
    """One ingested case: where it was written, and what mapping back to the scanner needs."""

    case_id: str
    folder: Path
    #: sequence -> float32 (x, y, z) array on the atlas grid (skull-stripped)
    arrays: dict[str, np.ndarray]
    atlas_affine: np.ndarray
    reference: str
    #: the reference series, and its image as acquired (``SimpleITK.Image``)
    reference_series: Series
    reference_image: Any
    #: atlas point -> reference point (ITK convention)
    to_reference: Any
    #: the brain mask on the atlas grid, bool (x, y, z)
    brain_mask: np.ndarray
    #: the atlas grid (``SimpleITK.Image``)
    atlas_image: Any
    record: dict[str, Any] = field(default_factory=dict)


def is_skull_stripped(image) -> bool:
    """Whether an image looks skull-stripped: a large share of exact zeros and a non-zero
    volume no larger than a brain."""
    import SimpleITK as sitk

    values = sitk.GetArrayViewFromImage(image)
    nonzero = np.count_nonzero(values)
    volume_ml = nonzero * float(np.prod(image.GetSpacing())) / 1000.0
    return (1.0 - nonzero / values.size) >= STRIPPED_ZERO_SHARE and volume_ml <= STRIPPED_MAX_ML


def safe_case_id(case_id: str, series: Sequence[Series], index: int) -> tuple[str, str | None]:
    """``case_id`` unless it contains the patient's name or ID (then ``case-<index>``), and a
    note saying so."""
    words = set()
    for s in series:
        for identifier in s.identifiers:
            words |= {w.lower() for w in re.split(r"[\^\s,._-]+", identifier) if len(w) >= 3}
    lowered = case_id.lower()
    if any(w in lowered for w in words):
        new = f"case-{index:03d}"
        return new, f"the folder name holds a patient identifier: the case is written as {new}"
    return case_id, None


def _grid_record(image) -> dict[str, Any]:
    return {"size": list(image.GetSize()), "spacing_mm": [round(v, 6) for v in image.GetSpacing()],
            "origin_lps_mm": [round(v, 4) for v in image.GetOrigin()],
            "direction": [round(v, 6) for v in image.GetDirection()]}


class Ingest:
    """The ingest of one case, stage by stage (``timings`` records seconds per stage)."""

    def __init__(self, case_id: str, folder: Path, overrides: Mapping[str, str] | None = None,
                 skip: Sequence[str] = (), known: Mapping[str, Any] | None = None):
        """``known``: transforms (reference point -> sequence point) used instead of registering
        those sequences (``bench/raw_recovery.py`` gives the true ones)."""
        self.case_id, self.folder, self.known = case_id, Path(folder), dict(known or {})
        self.overrides, self.skip = dict(overrides or {}), tuple(skip)
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()

    def _lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round(now - self._clock, 3)
        self._clock = now

    def run(self, index: int = 1) -> IngestedCase:
        import SimpleITK as sitk

        series = find_series(self.folder)
        if not series:
            raise InconsistentCase(self.folder, "no DICOM series or NIfTI files found")
        # messages, tables and outputs name the case without the patient's name or ID
        self.case_id, self.renamed = safe_case_id(self.case_id, series, index)
        case_id, renamed = self.case_id, self.renamed
        check_one_examination(case_id, series)
        chosen, decisions = identify(case_id, series, self.overrides, self.skip)
        self.decisions = decisions
        images = {m: s.image() for m, s in chosen.items()}
        self._lap("read")
        # the sequence deepbet runs on (None: the images are skull-stripped already)
        extract_from = None if all(is_skull_stripped(image) for image in images.values()) else \
            brain.choose_sequence(tuple(images))
        if extract_from is not None and extract_from[0] is None:
            raise InconsistentCase(case_id, f"{extract_from[1]}; give skull-stripped images or add a T1/T1ce series")
        reference = next(m for m in REFERENCE_ORDER if m in images)
        fixed = images[reference]
        registrations = {}
        for sequence, image in images.items():
            if sequence == reference:
                continue
            if sequence in self.known:
                registrations[sequence] = register.given(self.known[sequence], fixed, image)
                continue
            registrations[sequence] = register.rigid(fixed, image)
            register.check_converged(self.case_id, f"{chosen[sequence].label} to the {reference.upper()}", "sequence",
                                     registrations[sequence])
        self._lap("register sequences")
        mask_grid, mask, brain_record = self._brain(images, reference, registrations, extract_from)
        self._lap("brain extraction")
        moving = sitk.Resample(fixed, mask_grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32) * \
            sitk.Cast(mask, sitk.sitkFloat32)
        template = register.atlas()
        to_atlas = register.rigid(template, moving, initial="moments", shrink=register.ATLAS_SHRINK, iterations=100)
        register.check_converged(self.case_id, f"the {reference.upper()}'s brain to the MNI152 atlas", "atlas", to_atlas)
        self._lap("register to atlas")
        atlas_mask = sitk.Resample(sitk.Cast(mask, sitk.sitkFloat32), template, to_atlas.transform, sitk.sitkLinear, 0.0) > 0.5
        atlas_mask = to_xyz(atlas_mask).astype(bool)
        arrays = {}
        for sequence, image in images.items():
            chain = to_atlas.transform if sequence == reference else \
                sitk.CompositeTransform([registrations[sequence].transform, to_atlas.transform])
            resampled = sitk.Resample(image, template, chain, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            arrays[sequence] = np.where(atlas_mask, np.maximum(to_xyz(resampled), 0.0), 0.0).astype(np.float32)
        self._lap("resample to atlas")
        record = {
            "case_id": case_id,
            "note": renamed,
            "atlas": register.ATLAS_NAME,
            "atlas_grid": _grid_record(template),
            "reference_sequence": reference,
            "reference_grid": _grid_record(fixed),
            "sequences_present": list(images),
            "sequences_missing": [m for m in MODALITIES if m not in images],
            "series": [d.series.summary() | {"sequence": d.sequence, "identified_by": d.reason} for d in decisions],
            "inputs": {m: (chosen[m].source if m in chosen else None) for m in MODALITIES},
            "registrations": {f"{m}_to_{reference}": r.summary() for m, r in registrations.items()}
            | {f"{reference}_to_atlas": to_atlas.summary()},
            "brain": brain_record,
            "seconds": dict(self.timings),
        }
        return IngestedCase(case_id, self.folder, arrays, affine_of(template), reference, chosen[reference], fixed,
                            to_atlas.transform, atlas_mask, template, record)

    def _brain(self, images: dict, reference: str, registrations: dict, extract_from: tuple[str, str] | None):
        """The brain mask on a 1 mm R-A-S grid in the reference's space, and its record.
        ``extract_from``: the sequence deepbet runs on and what to say about it (from
        :func:`brain.choose_sequence`); None: the images are skull-stripped already."""
        import SimpleITK as sitk

        grid = ras_grid(images[reference])
        if extract_from is None:
            union = None
            for sequence, image in images.items():
                transform = registrations[sequence].transform if sequence in registrations else sitk.Transform()
                inside = sitk.Resample(image, grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32) > 0
                union = inside if union is None else (union | inside)
            mask = sitk.Cast(union, sitk.sitkUInt8)
            method, note = "none: the images are already skull-stripped (their non-zero voxels)", None
        else:
            sequence, note = extract_from
            transform = registrations[sequence].transform if sequence in registrations else None
            extracted = brain.extract(images[sequence], sequence, space=images[reference], transform=transform)
            mask, method = extracted.image, f"deepbet (ONNX) on the {sequence.upper()}"
        volume = float(sitk.GetArrayViewFromImage(mask).sum()) * float(np.prod(grid.GetSpacing())) / 1000.0
        if not BRAIN_ML[0] <= volume <= BRAIN_ML[1]:
            raise InconsistentCase(self.case_id, f"brain mask of {volume:.0f} ml, outside the plausible adult range "
                                                 f"{BRAIN_ML[0]:.0f}-{BRAIN_ML[1]:.0f} ml: check the series (or the skull stripping)")
        return grid, mask, {"method": method, "note": note, "volume_ml": round(volume, 1)}


@contextmanager
def staged(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """A hidden folder beside ``final`` to write into: renamed to ``final`` when the block ends
    without an error (replacing it with ``overwrite``), removed otherwise."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise InconsistentCase(final, "already exists (--overwrite replaces it)")
    staging = final.parent / f".{final.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_case(case: IngestedCase, out: Path, overwrite: bool = False) -> Path:
    """Write the BraTS-ready case (``<id>/<id>_{flair,t1,t1ce,t2}.nii.gz``, the brain mask and
    ``ingest.json``) into ``out``, all at once (:func:`staged`)."""
    import nibabel as nib

    final = Path(out) / case.case_id
    with staged(final, overwrite) as staging:
        for sequence, array in case.arrays.items():
            image = nib.Nifti1Image(array, case.atlas_affine)
            image.header.set_xyzt_units("mm")
            nib.save(image, staging / f"{case.case_id}_{sequence}.nii.gz")
        nib.save(nib.Nifti1Image(case.brain_mask.astype(np.uint8), case.atlas_affine), staging / f"{case.case_id}_brainmask.nii.gz")
        (staging / INGEST_JSON).write_text(json.dumps(case.record, indent=2) + "\n")
    return final
