"""Raw examinations the raw-path tests make: a phantom case (MNI152-shaped brain, tumour,
skull-stripped) with each sequence moved by a known rigid transform onto a coarse grid of its
own, written as DICOM series or NIfTI files (``brats_cggm.raw.simulate``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from brats_cggm import MODALITIES

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
#: coarse grids keep registration in the default suite to seconds
GRIDS = {"flair": ((3.0, 3.0, 4.0), "axial"), "t1": ((3.0, 3.0, 3.0), "sagittal"),
         "t1ce": ((3.0, 3.0, 3.0), "axial"), "t2": ((3.0, 3.0, 4.0), "axial")}
PATIENT = "DOE^JANE"


def phantom_images(seed: int = 3, size: int = 64) -> tuple[dict, np.ndarray, np.ndarray]:
    """``({sequence: SimpleITK.Image}, label (x, y, z), RAS affine)`` of one phantom case."""
    from brats_cggm.data.phantom import generate_case
    from brats_cggm.raw.grids import image_from

    case = generate_case(seed, size)
    return {m: image_from(case.images[m], case.affine) for m in MODALITIES}, case.label, case.affine


def write_exam(folder: Path, sequences=MODALITIES, dicom: bool = True, seed: int = 0, patient: str = PATIENT):
    """A raw examination of the phantom in ``folder``; returns the truth (``simulate.Moved`` per sequence)."""
    from brats_cggm.raw import simulate

    images, _, _ = phantom_images()
    return simulate.write_examination({m: images[m] for m in sequences}, folder, seed=seed, grids=GRIDS,
                                      dicom=dicom, patient=patient)


def copy_exam(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target
