"""The raw path on real scans (``../shared/data/{dicom,raw}``, skipped when absent): DICOM
geometry as the data's README records it, the enhanced series voxel-identical to dcm2niix's
conversion, brain masks and transforms close to the BraTS toolkit's on TCGA-FG-6692, and a
series that is no head refused by the brain-volume check. bench/raw_real.py has the figures."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from brats_cggm.errors import InconsistentCase
from brats_cggm.raw import brain, register
from brats_cggm.raw.ingest import Ingest
from brats_cggm.raw.series import find_series

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from raw_real import DICOM_README, orientation

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DICOM, RAW = SHARED / "dicom", SHARED / "raw" / "tcga_fg_6692"
needs_dicom = pytest.mark.skipif(not DICOM.is_dir(), reason=f"no real DICOM series at {DICOM} (a fresh clone has none)")
needs_raw = pytest.mark.skipif(not RAW.is_dir(), reason=f"no raw TCGA examination at {RAW} (a fresh clone has none)")


@needs_dicom
@pytest.mark.parametrize("name", sorted(DICOM_README))
def test_real_dicom_geometry_is_as_recorded(name):
    series = find_series(DICOM / name / "series")
    assert len(series) == 1
    image = series[0].image()
    size, spacing, origin, code = DICOM_README[name]
    assert image.GetSize() == size and orientation(image) == code
    np.testing.assert_allclose(image.GetSpacing(), spacing, atol=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), origin, atol=1e-3)


@needs_dicom
def test_the_enhanced_series_equals_dcm2niix_in_world_coordinates():
    image = find_series(DICOM / "siemens_xa30_t1_enhanced" / "series")[0].image()
    reference = sitk.ReadImage(str(DICOM / "siemens_xa30_t1_enhanced" / "reference.nii.gz"))
    ours = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, -1.0, sitk.sitkFloat32)
    assert (sitk.GetArrayFromImage(ours) == sitk.GetArrayFromImage(sitk.Cast(reference, sitk.sitkFloat32))).all()


@needs_dicom
@pytest.mark.slow  # the check itself: tests/test_raw_steps.py
def test_a_series_that_is_no_head_is_refused_by_its_brain_volume():
    # the GE "3D Ax T1 MP-RAGE" QA series images a structured object, not a head
    with pytest.raises(InconsistentCase, match=r"brain mask of \d+ ml, outside the plausible adult range 700-2300 ml"):
        Ingest("ge", DICOM / "ge_t1_mprage" / "series").run()


@needs_raw
def test_deepbet_against_hd_bet_on_a_raw_t1():
    t1 = sitk.Cast(sitk.ReadImage(str(RAW / "tcga_fg_6692_t1.nii.gz")), sitk.sitkFloat32)
    mask = brain.extract(t1, "t1")
    theirs = sitk.ReadImage(str(RAW / "reference" / "brats_toolkit" / "brainmask_native_t1.nii.gz"))
    ours = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(mask.image, sitk.sitkFloat32), theirs, sitk.Transform(),
                                                sitk.sitkLinear) > 0.5) > 0
    reference = sitk.GetArrayFromImage(theirs) > 0
    assert 2 * (ours & reference).sum() / (ours.sum() + reference.sum()) >= 0.95


@needs_raw
def test_t1_to_t1ce_agrees_with_the_brats_toolkit():
    t1, t1ce = (sitk.Cast(sitk.ReadImage(str(RAW / f"tcga_fg_6692_{s}.nii.gz")), sitk.sitkFloat32) for s in ("t1", "t1ce"))
    found = register.rigid(t1ce, t1)
    theirs = sitk.ReadTransform(str(RAW / "reference" / "brats_toolkit" / "transforms" / "t1ce_to_t1_0GenericAffine.mat"))
    mask = sitk.ReadImage(str(RAW / "reference" / "t1ce_brainmask_native.nii.gz"))
    assert register.mean_displacement(found.transform, theirs.GetInverse(), mask) < 1.0
    assert found.metric_after < register.METRIC_LIMIT["sequence"]
