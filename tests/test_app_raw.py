"""The app takes raw examinations: a zip of DICOM series, or sequence files on their own grids,
go through the raw path; the result is shown on the T1ce as acquired and the downloads
include the native-grid label map and the DICOM SEG."""

from __future__ import annotations

import zipfile

import nibabel as nib
import numpy as np
import pytest
from raw_exams import write_exam

from brats_cggm.inference.segmenter import Segmenter
from brats_cggm_app.service import RawCase, Runner, Workspace, describe_upload, guess_assignment


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    return Runner(Segmenter.load("brats_cggm_phantom_demo"), Workspace(tmp_path_factory.mktemp("work")))


def test_a_zip_of_dicom_series_is_segmented_on_the_t1ce_as_acquired(runner, tmp_path):
    truth = write_exam(tmp_path / "visit")
    archive = tmp_path / "visit.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted((tmp_path / "visit").rglob("*.dcm")):
            handle.write(path, path.relative_to(tmp_path))
    assert "DICOM series" in describe_upload([archive.name])
    case = runner.case([archive], guess_assignment([archive.name]), tmp_path / "staging")
    assert isinstance(case, RawCase)
    outcome = runner.run(case, tmp_path / "out")
    t1ce = truth["t1ce"].image
    assert outcome.prediction.shape == t1ce.GetSize() and set(outcome.images) == {"t1ce"}
    assert nib.load(outcome.label_map).shape == t1ce.GetSize() and (np.asarray(nib.load(outcome.label_map).dataobj) > 0).any()
    assert [p.suffix for p in outcome.extra_files] == [".dcm"] and outcome.extra_files[0].is_file()
    views = runner.views(outcome, tmp_path / "views")
    assert list(views.sequences) == ["t1ce"] and not list(views.contributors)


def test_sequence_files_on_their_own_grids_take_the_raw_path(runner, tmp_path):
    write_exam(tmp_path / "n", sequences=("flair", "t1ce"), dicom=False)
    files = [str(tmp_path / "n" / f"scan_{m}.nii.gz") for m in ("flair", "t1ce")]
    case = runner.case(files, {"flair": 0, "t1": None, "t1ce": 1, "t2": None}, tmp_path / "staging")
    assert isinstance(case, RawCase) and case.overrides == {"flair": "scan_flair.nii.gz", "t1ce": "scan_t1ce.nii.gz"}
