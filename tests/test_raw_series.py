"""Reading raw examinations: DICOM series written from a phantom come back with their exact
geometry and values; every kind of bad input is refused with one line naming the series."""

from __future__ import annotations

import shutil
import zipfile

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from raw_exams import write_exam

from brats_cggm.errors import BadInputFile, InconsistentCase
from brats_cggm.raw.cases import raw_cases
from brats_cggm.raw.series import check_one_examination, find_series, group_cases


@pytest.fixture(scope="module")
def exam(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw") / "exam"
    return folder, write_exam(folder)


def fresh(exam, tmp_path):
    target = tmp_path / "exam"
    shutil.copytree(exam[0], target)
    return target


def test_series_come_back_with_their_grid_and_values(exam):
    folder, truth = exam
    series = find_series(folder)
    assert [s.description for s in series] == ["AX T2 FLAIR", "SAG T1 SE", "AX T1 POST GAD", "AX T2 TSE"]
    for item, (sequence, moved) in zip(series, truth.items()):
        image, expected = item.image(), moved.image
        assert image.GetSize() == expected.GetSize(), sequence
        np.testing.assert_allclose(image.GetOrigin(), expected.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(image.GetSpacing(), expected.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(image.GetDirection(), expected.GetDirection(), atol=1e-6)
        values, want = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(expected)
        assert np.abs(values - want).max() <= want.max() / 32000 + 1e-6  # int16 with a rescale slope
    assert series[1].header["repetition_time_ms"] == 500.0 and series[2].header["contrast_agent"] == "GADOLINIUM"


def test_slices_are_sorted_by_position_not_by_name(exam, tmp_path):
    folder = fresh(exam, tmp_path)
    files = sorted((folder / "series_02").iterdir())
    for k, path in enumerate(files):  # names in reverse slice order
        path.rename(path.with_name(f"x{len(files) - k:04d}.dcm"))
    image = next(s for s in find_series(folder) if s.number == 2).image()
    np.testing.assert_allclose(image.GetOrigin(), exam[1]["flair"].image.GetOrigin(), atol=1e-4)


def _edit(path, **values):
    ds = pydicom.dcmread(path)
    for key, value in values.items():
        setattr(ds, key, value)
    ds.save_as(path)


@pytest.mark.parametrize("problem, expected", [
    ("missing slice", r"series 2 'AX T2 FLAIR' \(series_02\): slices 5 and 6 \(of \d+\) are 8\.00 mm apart, the others 4\.00 mm \(a slice missing\?\)"),
    ("two slices", r"is a 2-D series \(2 slice\(s\)\)"),
    ("localizer", r"is a localizer \(ImageType LOCALIZER\): leave it out with --skip 2"),
    ("CT", r"a CT object, not MR"),
    ("not an image", r"a DICOM Basic Text SR Storage object, not an MR image"),
    ("repeated position", r"several images at one slice position"),
])
def test_bad_series_are_refused_with_one_line(exam, tmp_path, problem, expected):
    folder = fresh(exam, tmp_path)
    files = sorted((folder / "series_02").iterdir())
    if problem == "missing slice":
        files[5].unlink()
    elif problem == "two slices":
        for path in files[2:]:
            path.unlink()
    elif problem == "localizer":
        _edit(files[0], ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    elif problem == "CT":
        _edit(files[3], Modality="CT")
    elif problem == "not an image":
        _edit(files[3], SOPClassUID="1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR
    elif problem == "repeated position":
        ds = pydicom.dcmread(files[4])
        ds.ImagePositionPatient = pydicom.dcmread(files[3]).ImagePositionPatient
        ds.save_as(files[4])
    with pytest.raises(BadInputFile, match=expected) as error:
        find_series(folder)
    assert "\n" not in str(error.value)


def test_two_patients_or_studies_in_one_case_are_refused(exam, tmp_path):
    folder = fresh(exam, tmp_path)
    for path in (folder / "series_05").iterdir():
        _edit(path, StudyInstanceUID="1.2.3.4")
    with pytest.raises(InconsistentCase, match="more than one study"):
        check_one_examination("exam", find_series(folder))
    for path in (folder / "series_05").iterdir():
        _edit(path, PatientID="SOMEONE")
    with pytest.raises(InconsistentCase, match="more than one patient") as error:
        check_one_examination("exam", find_series(folder))
    assert "SOMEONE" not in str(error.value) and "DOE" not in str(error.value)


def test_cases_in_folders_and_zips(exam, tmp_path):
    one = fresh(exam, tmp_path)
    assert group_cases(one) == [("exam", one)]  # series sub-folders of one study: one case
    many = tmp_path / "many"
    many.mkdir()
    shutil.copytree(one, many / "a")
    write_exam(many / "b", sequences=("t1ce", "flair"), dicom=False)
    assert [c for c, _ in group_cases(many)] == ["a", "b"]
    single = tmp_path / "single"
    shutil.copytree(one / "series_04", single / "series_04")
    assert group_cases(single) == [("single", single)]  # its only sub-folder is a series, not a case
    archive = tmp_path / "visit.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in one.rglob("*"):
            z.write(path, path.relative_to(one.parent))
    with raw_cases([archive]) as cases:
        assert [c for c, _ in cases] == ["exam"] and len(find_series(cases[0][1])) == 4


def test_nifti_files_are_series_too(tmp_path):
    write_exam(tmp_path / "n", dicom=False)
    series = find_series(tmp_path / "n")
    assert [s.source for s in series] == ["scan_flair.nii.gz", "scan_t1.nii.gz", "scan_t1ce.nii.gz", "scan_t2.nii.gz"]
    assert all(s.kind == "nifti" for s in series)
