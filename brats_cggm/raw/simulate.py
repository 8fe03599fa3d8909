"""Raw examinations with known answers: a BraTS-ready case with each sequence moved by its own
random rigid transform and resampled onto a grid of its own (1 mm, or clinical: thick axial
slices, a sagittal series), written as classic DICOM series (one MR Image file per slice) or
NIfTI files. The tests and ``bench/raw_recovery.py`` feed them to ``ingest`` and compare the
transforms and segmentations it finds with the truth.

Each moved image ``M`` satisfies ``M(q) = I(T(q))``: ``T`` (ITK convention) maps a point of
the moved sequence's space to the original case's space.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brats_cggm import MODALITIES

#: (voxel size in mm, slice axis: "axial" or "sagittal") per sequence, as a clinic might scan
CLINICAL = {"flair": ((0.9, 0.9, 5.0), "axial"), "t1": ((1.0, 1.0, 4.0), "sagittal"),
            "t1ce": ((1.0, 1.0, 3.0), "axial"), "t2": ((0.9, 0.9, 4.0), "axial")}
ISOTROPIC = {m: ((1.0, 1.0, 1.0), "axial") for m in MODALITIES}
#: DICOM header fields per sequence (description, TR, TE, TI)
HEADERS = {"flair": ("AX T2 FLAIR", 9000.0, 120.0, 2500.0), "t1": ("SAG T1 SE", 500.0, 12.0, None),
           "t1ce": ("AX T1 POST GAD", 500.0, 12.0, None), "t2": ("AX T2 TSE", 4000.0, 100.0, None)}
#: LPS direction cosines (columns: index axes) of axial and sagittal acquisitions
DIRECTIONS = {"axial": np.eye(3), "sagittal": np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])}


@dataclass
class Moved:
    image: object  # SimpleITK.Image on its own grid
    #: moved point -> original point (ITK convention)
    transform: object


def random_rigid(rng: np.random.Generator, centre, max_degrees: float = 15.0, max_mm: float = 20.0):
    """A rigid transform about ``centre``: a rotation of up to ``max_degrees`` about a random
    axis and a translation of up to ``max_mm``."""
    import SimpleITK as sitk

    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.radians(rng.uniform(-max_degrees, max_degrees))
    direction = rng.normal(size=3)
    shift = direction / np.linalg.norm(direction) * rng.uniform(0, max_mm)
    transform = sitk.VersorRigid3DTransform()
    transform.SetCenter([float(c) for c in centre])
    transform.SetRotation(axis.tolist(), float(angle))
    transform.SetTranslation(shift.tolist())
    return transform


def _grid(image, transform, spacing, orientation: str):
    """A grid with ``spacing`` and the acquisition's orientation that covers ``image`` as seen
    from the moved space (the inverse of ``transform``)."""
    import SimpleITK as sitk

    inverse = transform.GetInverse()
    size = np.array(image.GetSize()) - 1
    corners = np.array([inverse.TransformPoint(image.TransformContinuousIndexToPhysicalPoint(
        [float(c) for c in np.array(k) * size])) for k in np.ndindex(2, 2, 2)])
    direction = DIRECTIONS[orientation]
    along = corners @ direction  # coordinates along the grid's axes
    low, high = along.min(axis=0), along.max(axis=0)
    grid = sitk.Image([int(np.ceil((h - lo) / s)) + 1 for lo, h, s in zip(low, high, spacing)], sitk.sitkFloat32)
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetDirection(direction.flatten().tolist())
    grid.SetOrigin((direction @ low).tolist())
    return grid


def move(images: dict, seed: int = 0, grids: dict = ISOTROPIC) -> dict[str, Moved]:
    """Each sequence of ``images`` (``{sequence: SimpleITK.Image}`` on one grid) moved by its own
    random rigid transform and resampled (linearly) onto a grid of ``grids``."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    moved = {}
    for sequence, image in images.items():
        centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
        transform = random_rigid(rng, centre)
        spacing, orientation = grids[sequence]
        grid = _grid(image, transform, spacing, orientation)
        moved[sequence] = Moved(sitk.Resample(image, grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32), transform)
    return moved


def write_dicom(image, folder: Path, sequence: str, series_number: int, study_uid: str, patient: str = "ANONYMOUS^PHANTOM",
                frame_of_reference: str | None = None) -> list[Path]:
    """Write ``image`` as a classic DICOM MR series, one file per slice, int16 with a rescale
    slope so the float values survive to 1/1000 of their range."""
    import pydicom
    import SimpleITK as sitk
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    values = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))  # x, y, z
    top = float(max(values.max(), 1e-6))
    slope = top / 32000.0
    description, tr, te, ti = HEADERS[sequence]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    series_uid, frame_uid = generate_uid(), frame_of_reference or generate_uid()
    paths = []
    for k in range(values.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientName, ds.PatientID = "MR", patient, patient
        ds.PatientBirthDate, ds.PatientSex, ds.AccessionNumber, ds.ReferringPhysicianName = "", "O", "", ""
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.Manufacturer = "20260101", "120000", "1", "brats-cggm simulate"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = series_number, k + 1, description
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
        ds.RepetitionTime, ds.EchoTime = tr, te
        if ti is not None:
            ds.InversionTime, ds.ScanningSequence = ti, ["SE", "IR"]
        else:
            ds.ScanningSequence = "SE"
        if sequence == "t1ce":
            ds.ContrastBolusAgent = "GADOLINIUM"
        ds.ImagePositionPatient = [round(float(v), 6) for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [float(image.GetSpacing()[1]), float(image.GetSpacing()[0])]  # row, column spacing
        ds.SliceThickness = float(image.GetSpacing()[2])
        ds.Rows, ds.Columns = values.shape[1], values.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0.0, round(slope, 9)
        pixels = np.round(values[:, :, k].T / ds.RescaleSlope).astype(np.int16)
        ds.PixelData = pixels.tobytes()
        path = folder / f"{series_number:03d}_{k + 1:04d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def write_examination(images: dict, out: Path, seed: int = 0, grids: dict = ISOTROPIC, dicom: bool = True,
                      patient: str = "ANONYMOUS^PHANTOM") -> dict[str, Moved]:
    """A raw examination of ``images`` in ``out``: one DICOM series folder (or NIfTI file) per
    sequence, each moved and on its own grid; returns the truth."""
    import SimpleITK as sitk
    from pydicom.uid import generate_uid

    moved = move(images, seed, grids)
    out.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    frame = generate_uid()
    for number, (sequence, item) in enumerate(moved.items(), 2):
        if dicom:
            write_dicom(item.image, out / f"series_{number:02d}", sequence, number, study, patient, frame)
        else:
            sitk.WriteImage(item.image, str(out / f"scan_{sequence}.nii.gz"))
    return moved
