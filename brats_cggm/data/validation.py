"""Checking cases before anything trains on them or predicts from them.

:func:`inspect_case` reads a case's headers and voxels and lists every problem as a
one-line error naming the file; :func:`validate_case` raises the first. The loaders call
:func:`validate_case`, so ``brats-cggm check`` and a training run report the same errors.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from brats_cggm import MODALITIES
from brats_cggm.data.labels import SCHEMES
from brats_cggm.data.layouts import Case
from brats_cggm.errors import BadInputFile, InconsistentCase

AFFINE_TOLERANCE = 1e-3  # mm; real BraTS files agree to float32 precision


@dataclass
class CaseReport:
    """What ``check`` prints for one case."""

    case_id: str
    shape: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    orientation: str | None = None
    label_values: tuple[int, ...] | None = None
    problems: list[BadInputFile | InconsistentCase] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class Volume:
    """One 3-D sequence (or label map) as read from its file."""

    path: Path
    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = None


def _read(path: Path, problems: list) -> Volume | None:
    """Load one NIfTI fully; on failure append the reason and return None."""
    if path.is_dir():
        problems.append(BadInputFile(path, "is a folder, not a NIfTI file"))
        return None
    if not path.is_file():
        problems.append(BadInputFile(path, "file is missing"))
        return None
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises many types for non-NIfTI content
        problems.append(BadInputFile(path, _load_failure(path, error)))
        return None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        problems.append(BadInputFile(path, f"is a {type(image).__name__}, not a NIfTI file"))
        return None
    if not np.isfinite(image.affine).all() or abs(np.linalg.det(image.affine[:3, :3])) < 1e-9:
        problems.append(BadInputFile(path, "has a degenerate affine (no voxel-to-world mapping)"))
        return None
    try:
        data = np.asanyarray(image.dataobj)
    except MemoryError:
        problems.append(BadInputFile(path, f"header claims shape {image.shape}, too large to read: corrupt header?"))
        return None
    except (EOFError, OSError, ValueError, zlib.error) as error:
        problems.append(BadInputFile(path, f"is truncated: its voxel data cannot be read ({error.__class__.__name__})"))
        return None
    return Volume(path, data, image.affine, image.header)


def _load_failure(path: Path, error: Exception) -> str:
    """Why nibabel could not open ``path``, in words a user can act on."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(2)
    except OSError as os_error:
        return f"cannot be read ({os_error.strerror})"
    if not head:
        return "is empty (0 bytes)"
    if path.name.endswith(".gz") and head != b"\x1f\x8b":
        return "is named .gz but is not gzip-compressed"
    if isinstance(error, (EOFError, gzip.BadGzipFile, zlib.error)) or "truncat" in str(error).lower():
        return f"is truncated ({error.__class__.__name__})"
    return f"is not a NIfTI file ({error.__class__.__name__})"


def _check_values(volume: Volume, what: str, problems: list) -> None:
    data = volume.data
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        problems.append(BadInputFile(volume.path, f"{bad} NaN/Inf voxel(s) in the {what}"))
    elif not np.any(data):
        problems.append(BadInputFile(volume.path, f"the {what} is all zero"))


def _sequences(case: Case, problems: list) -> dict[str, Volume]:
    """The case's sequences as 3-D volumes (split from the 4-D file for ``msd``), by
    modality; a sequence the case lacks (``None`` in ``images``) is left out."""
    if len(case.images) == 1:
        volume = _read(case.images[0], problems)
        if volume is None:
            return {}
        if volume.data.ndim != 4 or volume.data.shape[3] != len(MODALITIES):
            problems.append(BadInputFile(volume.path, f"expected a 4-D image with {len(MODALITIES)} sequences, got shape {volume.data.shape}"))
            return {}
        return {m: Volume(volume.path, volume.data[..., c], volume.affine, volume.header) for m, c in zip(MODALITIES, case.channels)}
    volumes = {}
    for modality, path in zip(MODALITIES, case.images):
        volume = _read(path, problems) if path is not None else None
        if volume is None:
            continue
        if volume.data.ndim != 3:
            problems.append(BadInputFile(path, f"expected a 3-D {modality} image, got {volume.data.ndim}-D shape {volume.data.shape}"))
            continue
        volumes[modality] = volume
    return volumes


def _same_grid(reference: Volume, other: Volume, what: str, problems: list) -> bool:
    if other.data.shape[:3] != reference.data.shape[:3]:
        problems.append(InconsistentCase(other.path, f"{what} shape {other.data.shape[:3]} differs from {reference.path.name} {reference.data.shape[:3]}"))
        return False
    if not np.allclose(other.affine, reference.affine, atol=AFFINE_TOLERANCE):
        shift = np.abs(other.affine - reference.affine).max()
        problems.append(InconsistentCase(other.path, f"{what} affine differs from {reference.path.name} (by up to {shift:.3g} mm)"))
        return False
    return True


def inspect_case(case: Case) -> CaseReport:
    """Every problem of ``case``, plus what a reader wants to see (shape, spacing, ...)."""
    report = CaseReport(case.case_id)
    volumes = _checked_sequences(case, report.problems)
    reference = next(iter(volumes.values()), None)
    if reference is not None:
        report.shape = tuple(int(s) for s in reference.data.shape)
        report.spacing = tuple(float(s) for s in np.round(np.linalg.norm(reference.affine[:3, :3], axis=0), 3))
        report.orientation = "".join(nib.aff2axcodes(reference.affine))
    if case.label is not None:
        label = _read(case.label, report.problems)
        if label is not None:
            _check_label(case, label, reference, report)
    return report


def _checked_sequences(case: Case, problems: list) -> dict[str, Volume]:
    volumes = _sequences(case, problems)
    for modality, volume in volumes.items():
        _check_values(volume, f"{modality} sequence" if len(case.images) > 1 else "image", problems)
    reference = next(iter(volumes.values()), None)
    for volume in list(volumes.values())[1:]:
        _same_grid(reference, volume, "sequence", problems)
    return volumes


def load_sequences(case: Case) -> dict[str, Volume]:
    """The sequences of ``case`` (those it has: ``None`` in ``images`` marks a missing one)
    as checked 3-D volumes on one grid, by modality; raises the first problem."""
    problems: list = []
    volumes = _checked_sequences(case, problems)
    if problems:
        raise problems[0]
    if not volumes:
        raise InconsistentCase(case.case_id, "has no image")
    return volumes


def _check_label(case: Case, label: Volume, reference: Volume | None, report: CaseReport) -> None:
    problems = report.problems
    if label.data.ndim != 3:
        problems.append(BadInputFile(label.path, f"expected a 3-D label map, got shape {label.data.shape}"))
        return
    if reference is not None:
        _same_grid(reference, label, "label map", problems)
    data = label.data
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all():
            problems.append(BadInputFile(label.path, "NaN/Inf values in the label map"))
            return
        if not np.array_equal(data, np.round(data)):
            problems.append(BadInputFile(label.path, "label map has non-integer values"))
            return
    values = tuple(int(v) for v in np.unique(data))
    report.label_values = values
    scheme = SCHEMES[case.label_scheme]
    unexpected = sorted(set(values) - scheme.values)
    if unexpected:
        problems.append(BadInputFile(label.path, f"label values {unexpected} are not in the {scheme.name} scheme {sorted(scheme.values)}"))


def validate_case(case: Case) -> None:
    """Raise the first problem of ``case`` (a :class:`BadInputFile` or
    :class:`InconsistentCase`); return quietly when it is fine."""
    report = inspect_case(case)
    if report.problems:
        raise report.problems[0]
