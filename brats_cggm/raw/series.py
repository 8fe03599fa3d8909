"""Finding and reading the image series of raw examinations: DICOM series (classic one file
per slice, or enhanced multi-frame, any folder nesting) and NIfTI files, each on its own grid.

DICOM headers are read with pydicom (no pixels) to group the files by series, check them and
sort the slices along the slice normal; the voxels are read with SimpleITK (GDCM), which keeps
the patient geometry (``sitk.Image`` origin, spacing and direction in LPS mm). What the checks
refuse, each with one line naming the series: a non-MR or non-image object, a localizer, a
2-D series, slices missing or unevenly spaced, several images at one position, and patients
or studies mixed in one case.
"""

from __future__ import annotations

import zipfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brats_cggm.errors import BadInputFile, InconsistentCase

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: a slice gap further than this from the series' median gap (fraction of it) is uneven
GAP_TOLERANCE = 0.1
#: image storage SOP classes this path reads (MR Image, Enhanced MR Image)
MR_IMAGE_CLASSES = {"1.2.840.10008.5.1.4.1.1.4": "MR Image Storage", "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage"}
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


@dataclass
class Series:
    """One image series of a case: a DICOM series or a NIfTI file."""

    #: where it is, relative to the case folder (a folder for DICOM, the file for NIfTI)
    source: str
    kind: str  # "dicom" or "nifti"
    #: the files, slices sorted along the normal (DICOM) or the one file
    files: tuple[Path, ...]
    number: int | None = None
    description: str = ""
    #: header fields that identify the sequence (see identify.py); no patient data
    header: dict[str, Any] = field(default_factory=dict)
    #: (patient, study) keys to check one case is one examination; never written anywhere
    examination: tuple[str, str] | None = None
    #: patient name and ID, only to keep them out of output names; never written anywhere
    identifiers: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """How messages name it: ``series 13 'se2d1r' (t1ce_dir)`` or the file name."""
        if self.kind == "nifti":
            return self.source
        number = f"series {self.number} " if self.number is not None else "series "
        return f"{number}'{self.description}' ({self.source})"

    def image(self):
        """The series as a 3-D ``SimpleITK.Image`` (float32) with its scanner geometry."""
        import SimpleITK as sitk

        try:
            if self.kind == "dicom" and len(self.files) > 1:
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames([str(f) for f in self.files])
                image = reader.Execute()
            else:
                image = sitk.ReadImage(str(self.files[0]))
        except RuntimeError as error:
            first = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
            raise BadInputFile(self.files[0], f"cannot read {self.label}: {first}") from None
        if image.GetDimension() == 4:
            if image.GetSize()[3] != 1:
                raise BadInputFile(self.files[0], f"{self.label} is 4-D ({image.GetSize()[3]} volumes): give one volume")
            image = image[:, :, :, 0]
        if image.GetDimension() != 3 or min(image.GetSize()) < 2:
            raise BadInputFile(self.files[0], f"{self.label} is not a 3-D volume (size {image.GetSize()})")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise BadInputFile(self.files[0], f"{self.label} has colour pixels: not an MR image")
        return sitk.Cast(image, sitk.sitkFloat32)

    def summary(self) -> dict[str, Any]:
        """What ``ingest.json`` records of it (no patient data, no UIDs)."""
        return {"source": self.source, "kind": self.kind, "files": len(self.files), "series_number": self.number,
                "description": self.description, **{k: v for k, v in self.header.items() if v not in (None, "")}}


def unpack(path: Path, into: Path) -> Path:
    """A ``.zip`` is extracted into ``into`` (refusing names that leave it); anything else is itself."""
    if path.is_file() and path.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(path) as archive:
                root = into.resolve()
                for member in archive.namelist():
                    if not (root / member).resolve().is_relative_to(root):
                        raise BadInputFile(path, f"the archive holds a path outside itself: {member}")
                archive.extractall(root)
        except zipfile.BadZipFile as error:
            raise BadInputFile(path, f"not a readable zip archive ({error})") from None
        return into
    if not path.exists():
        raise BadInputFile(path, "does not exist")
    return path


def _files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not any(part.startswith(".") or part == "__MACOSX" for part in path.relative_to(root).parts):
            yield path


def _read_header(path: Path):
    """The DICOM header of ``path`` (no pixels), or None when it is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError, EOFError):
        return None


def find_series(root: Path) -> list[Series]:
    """Every image series under ``root`` (DICOM grouped by SeriesInstanceUID, and NIfTI files),
    checked: raises a :class:`~brats_cggm.errors.UserError` naming the first bad one."""
    nifti: list[Series] = []
    dicom: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    for path in _files(root):
        if is_nifti(path):
            nifti.append(Series(str(path.relative_to(root)), "nifti", (path,), description=path.name))
            continue
        header = _read_header(path)
        if header is None:
            continue  # not DICOM: README files, checksums, ...
        sop = str(header.get("SOPClassUID", getattr(header.file_meta, "MediaStorageSOPClassUID", "")))
        if sop == DICOMDIR_CLASS or path.name.upper() == "DICOMDIR":
            continue
        modality = str(header.get("Modality", "?"))
        if modality != "MR":
            raise BadInputFile(path, f"a {modality} object, not MR: this path reads MR series only (remove it)")
        if sop not in MR_IMAGE_CLASSES:
            raise BadInputFile(path, f"a DICOM {_sop_name(sop)} object, not an MR image (remove it)")
        dicom[str(header.get("SeriesInstanceUID", path.parent))].append((path, header))
    series = [_dicom_series(root, files) for files in dicom.values()]
    series.sort(key=lambda s: (s.number if s.number is not None else 1 << 30, s.source))
    return series + sorted(nifti, key=lambda s: s.source)


def _sop_name(sop: str) -> str:
    try:
        from pydicom.uid import UID

        return UID(sop).name or sop
    except (ValueError, TypeError):
        return sop or "unknown"


def _text(header, keyword: str) -> str:
    value = header.get(keyword, "")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _first(value: Any) -> Any:
    """A multi-valued element's first value (a single value is itself)."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return value[0] if len(value) else None
    return value


def _number(value: Any) -> float | None:
    try:
        return round(float(value), 3)
    except (TypeError, ValueError):
        return None


def _enhanced_parameters(header) -> dict[str, Any]:
    """TR, TE, TI and the contrast agent of an enhanced MR object (functional groups)."""
    found: dict[str, Any] = {}
    groups = header.get("SharedFunctionalGroupsSequence")
    frames = header.get("PerFrameFunctionalGroupsSequence")
    for group in [*(groups or [])[:1], *(frames or [])[:1]]:
        for item in group.get("MRTimingAndRelatedParametersSequence", []):
            found.setdefault("repetition_time_ms", _number(item.get("RepetitionTime")))
        for item in group.get("MREchoSequence", []):
            found.setdefault("echo_time_ms", _number(item.get("EffectiveEchoTime")))
        for item in group.get("MRModifierSequence", []):
            found.setdefault("inversion_time_ms", _number(_first(item.get("InversionTimes"))))
        for item in group.get("ContrastBolusUsageSequence", []):
            if str(item.get("ContrastBolusAgentAdministered", "")).upper() == "YES":
                found["contrast_agent"] = "administered"
    return {k: v for k, v in found.items() if v is not None}


def identification_header(header) -> dict[str, Any]:
    """The header fields the sequence identification reads (none of them about the patient)."""
    fields = {
        "protocol": _text(header, "ProtocolName"),
        "sequence_name": _text(header, "SequenceName") or _text(header, "PulseSequenceName"),
        "scanning_sequence": _text(header, "ScanningSequence"),
        "image_type": _text(header, "ImageType"),
        "repetition_time_ms": _number(header.get("RepetitionTime")),
        "echo_time_ms": _number(header.get("EchoTime")),
        "inversion_time_ms": _number(header.get("InversionTime")),
        "contrast_agent": _text(header, "ContrastBolusAgent"),
        "manufacturer": _text(header, "Manufacturer"),
    }
    for key, value in _enhanced_parameters(header).items():
        if fields.get(key) in (None, ""):
            fields[key] = value
    return fields


def _dicom_series(root: Path, files: list[tuple[Path, Any]]) -> Series:
    path, header = files[0]
    folders = {p.parent for p, _ in files}
    source = str(next(iter(folders)).relative_to(root)) if len(folders) == 1 else "."
    number = header.get("SeriesNumber")
    series = Series(
        source or ".", "dicom", tuple(p for p, _ in files), int(number) if number not in (None, "") else None,
        _text(header, "SeriesDescription") or _text(header, "ProtocolName"), identification_header(header),
        (str(header.get("PatientID", "")), str(header.get("StudyInstanceUID", ""))),
        tuple(v for v in (str(header.get("PatientName", "")), str(header.get("PatientID", ""))) if v.strip()),
    )
    if "LOCALIZER" in series.header["image_type"].upper().split("\\"):
        raise BadInputFile(path.parent, f"{series.label} is a localizer (ImageType LOCALIZER): leave it out with --skip {series.number}")
    frames = int(header.get("NumberOfFrames", 1) or 1)
    if len(files) == 1 and frames > 1:
        if frames < 3:
            raise BadInputFile(path, f"{series.label} is a 2-D series ({frames} frames): a volume is needed")
        return series
    if len({str(h.get('SOPInstanceUID', p)) for p, h in files}) < len(files):
        raise BadInputFile(path.parent, f"{series.label} holds the same image twice")
    series.files = _sorted_slices(series, files)
    return series


def _sorted_slices(series: Series, files: list[tuple[Path, Any]]) -> tuple[Path, ...]:
    """The files along the slice normal, checked for a 3-D, evenly spaced, single-image stack."""
    where = files[0][0].parent
    if len(files) < 3:
        raise BadInputFile(where, f"{series.label} is a 2-D series ({len(files)} slice(s)): a volume is needed")
    orientations = {tuple(np.round(np.asarray(h.get("ImageOrientationPatient", [0] * 6), float), 4)) for _, h in files}
    if len(orientations) != 1 or not any(next(iter(orientations))):
        raise BadInputFile(where, f"{series.label}: its slices do not share one orientation (a multi-planar or localizer series?)")
    row, column = np.asarray(next(iter(orientations))).reshape(2, 3)
    normal = np.cross(row, column)
    try:
        positions = np.array([float(np.dot(normal, np.asarray(h.ImagePositionPatient, float))) for _, h in files])
    except AttributeError:
        raise BadInputFile(where, f"{series.label}: a slice has no ImagePositionPatient") from None
    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    gaps = np.diff(positions)
    if (gaps < 1e-3).any():
        raise BadInputFile(where, f"{series.label}: several images at one slice position (a multi-echo, "
                                  "multi-volume or repeated series): give one volume")
    median = float(np.median(gaps))
    uneven = np.flatnonzero(np.abs(gaps - median) > GAP_TOLERANCE * median + 1e-3)
    if uneven.size:
        k = int(uneven[0])
        hint = " (a slice missing?)" if gaps[k] > 1.5 * median else ""
        raise BadInputFile(where, f"{series.label}: slices {k + 1} and {k + 2} (of {len(files)}) are {gaps[k]:.2f} mm apart, "
                                  f"the others {median:.2f} mm{hint}: the series must be evenly spaced")
    return tuple(files[i][0] for i in order)


def group_cases(root: Path) -> list[tuple[str, Path]]:
    """The cases under ``root``: ``[(case id, folder)]``. ``root`` is one case when image files
    sit in it directly, when its sub-folders' DICOM series share one study, or when its only
    sub-folder is a DICOM series folder; otherwise each sub-folder holding images is a case."""
    direct = [p for p in root.iterdir() if p.is_file() and (is_nifti(p) or _read_header(p) is not None)]
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX")
    if direct or not folders:
        return [(root.name, root)]
    studies: dict[Path, set[str]] = {}
    for folder in folders:
        found = set()
        for path in _files(folder):
            if is_nifti(path):
                found.add(f"nifti:{folder}")
                break
            header = _read_header(path)
            if header is not None and "StudyInstanceUID" in header:
                found.add(str(header.StudyInstanceUID))
                break
        if found:
            studies[folder] = found
    every = set().union(*studies.values()) if studies else set()
    if len(studies) > 1 and len(every) == 1:
        return [(root.name, root)]
    if len(studies) == 1 and every and not next(iter(every)).startswith("nifti:"):
        only = next(iter(studies))
        if any(p.is_file() and _read_header(p) is not None for p in only.iterdir()):
            return [(root.name, root)]  # one DICOM series folder: ``root`` is its case
    return [(folder.name, folder) for folder in studies]


def check_one_examination(case_id: str, series: list[Series]) -> None:
    """DICOM series of one case must come from one patient and one study."""
    keys = {s.examination for s in series if s.examination is not None}
    if len({k[0] for k in keys}) > 1:
        raise InconsistentCase(case_id, "its DICOM series come from more than one patient: one case, one examination")
    if len({k[1] for k in keys}) > 1:
        labels = ", ".join(s.label for s in series if s.kind == "dicom")
        raise InconsistentCase(case_id, f"its DICOM series come from more than one study ({labels}): one case, one examination")
