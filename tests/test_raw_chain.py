"""The raw path end to end on a phantom examination with known transforms, written as DICOM
series: ``brats-cggm ingest`` makes a BraTS-ready case that ``check`` accepts, with the
transforms recovered, no patient identifier anywhere; ``predict --raw`` puts the labels on the
T1ce series' own grid and writes a DICOM SEG that reads back as the same regions."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from inference_cases import cli
from raw_exams import phantom_images, write_exam

from brats_cggm.errors import InconsistentCase
from brats_cggm.raw.dicom_seg import read_seg
from brats_cggm.raw.grids import affine_of, to_xyz
from brats_cggm.raw.ingest import Ingest, IngestedCase, write_case
from brats_cggm.raw.register import from_matrix, mean_displacement
from brats_cggm.raw.series import find_series

MODEL = "brats_cggm_phantom_demo"


@pytest.fixture(scope="module")
def exam(tmp_path_factory):
    # the folder is named after the patient, as PACS exports often are
    folder = tmp_path_factory.mktemp("raw") / "DOE_JANE_2026"
    return folder, write_exam(folder)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """``ingest`` of an examination with a T1ce only, in a folder named after the patient."""
    folder = tmp_path_factory.mktemp("raw") / "jane_doe"
    write_exam(folder, sequences=("t1ce",))
    out = tmp_path_factory.mktemp("ingested")
    code, text = cli("ingest", folder, "--out", out)
    return code, text, out


@pytest.fixture(scope="module")
def predicted(exam, tmp_path_factory):
    out = tmp_path_factory.mktemp("predicted")
    code, text = cli("predict", "--raw", "--input", exam[0], "--out", out, "--model", MODEL)
    return code, text, out


def test_ingest_writes_a_case_check_accepts(ingested):
    code, text, out = ingested
    assert code == 0, text
    row = re.search(r"series 2 'AX T1 POST GAD' \(series_02\)\W+(\w+)\W+name 'ax t1 post gad'", text)
    assert row and row[1] == "T1CE", text  # the identification table
    assert "missing: flair, t1, t2" in text
    case = out / "case-001"
    assert sorted(p.name for p in case.iterdir()) == ["case-001_brainmask.nii.gz", "case-001_t1ce.nii.gz", "ingest.json"]
    record = json.loads((case / "ingest.json").read_text())
    assert record["sequences_missing"] == ["flair", "t1", "t2"] and record["reference_sequence"] == "t1ce"
    image = nib.load(case / "case-001_t1ce.nii.gz")
    assert image.shape == (197, 233, 189) and np.allclose(np.diag(image.affine)[:3], 1.0)
    brain = np.asarray(nib.load(case / "case-001_brainmask.nii.gz").dataobj) > 0
    assert ((np.asarray(image.dataobj) > 0) <= brain).all()


def test_no_patient_identifier_in_any_output(ingested, predicted):
    for _, text, out in (ingested, predicted):
        assert "folder name holds a patient identifier" in text
        for path in out.rglob("*"):
            assert "doe" not in path.name.lower() and "jane" not in path.name.lower()
            if path.suffix == ".json":
                content = path.read_text().lower()
                assert "doe" not in content and "jane" not in content, path


def test_ingest_recovers_the_known_transforms(exam, predicted):
    _, truth = exam
    record = json.loads((predicted[2] / "case-001" / "brats" / "case-001" / "ingest.json").read_text())
    images, _, _ = phantom_images()
    brain = sitk.Resample(sitk.Cast(images["t1ce"] > 0, sitk.sitkUInt8), truth["t1ce"].image, truth["t1ce"].transform,
                          sitk.sitkNearestNeighbor)
    for sequence in ("flair", "t1", "t2"):
        affine = from_matrix(record["registrations"][f"{sequence}_to_t1ce"]["matrix_lps"])
        true = sitk.CompositeTransform([truth[sequence].transform.GetInverse(), truth["t1ce"].transform])
        assert mean_displacement(affine, true, brain) < 1.5, sequence  # 3-4 mm voxels
    assert record["brain"]["method"].startswith("none: the images are already skull-stripped")
    assert 700 < record["brain"]["volume_ml"] < 2300
    assert record["sequences_missing"] == [] and set(record["seconds"]) >= {"read", "register to atlas"}


def test_predict_raw_labels_on_the_t1ce_series_grid(exam, predicted):
    code, text, out = predicted
    assert code == 0, text
    case = out / "case-001"
    series = next(s for s in find_series(exam[0]) if s.description == "AX T1 POST GAD")
    t1ce = series.image()
    seg = nib.load(case / "case-001_seg.nii.gz")
    labels = np.asarray(seg.dataobj)
    assert seg.shape == t1ce.GetSize() and np.allclose(seg.affine, affine_of(t1ce), atol=1e-4)
    assert set(np.unique(labels)) <= {0, 1, 2, 4} and (labels > 0).sum() > 0
    report = json.loads((case / "case-001.json").read_text())
    voxel_ml = abs(np.linalg.det(seg.affine[:3, :3])) / 1000
    assert report["volumes_ml"]["WT"] == pytest.approx((labels > 0).sum() * voxel_ml, rel=1e-3)
    assert (case / "atlas" / "case-001.nii.gz").is_file() and (case / "brats" / "case-001" / "ingest.json").is_file()
    assert cli("check", case / "brats")[0] == 0  # the BraTS-ready case the model saw
    # the tumour lands where the phantom's tumour is, seen on the moved T1ce grid
    _, label, affine = phantom_images()
    from brats_cggm.raw.grids import image_from

    truth = to_xyz(sitk.Resample(image_from(label, affine), t1ce, exam[1]["t1ce"].transform, sitk.sitkNearestNeighbor))
    overlap = 2 * ((labels > 0) & (truth > 0)).sum() / ((labels > 0).sum() + (truth > 0).sum())
    assert overlap > 0.5


def test_the_dicom_seg_reads_back_as_the_nifti(exam, predicted):
    case = predicted[2] / "case-001"
    series = next(s for s in find_series(exam[0]) if s.description == "AX T1 POST GAD")
    labels = np.asarray(nib.load(case / "case-001_seg.nii.gz").dataobj)
    regions = read_seg(case / "case-001_seg.dcm", series.files)
    expected = np.stack([np.isin(labels, (1, 4)), labels > 0, labels == 4])
    assert regions.shape == expected.shape and (regions == expected).all()
    import pydicom

    seg = pydicom.dcmread(case / "case-001_seg.dcm")
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(series.files[0]).SeriesInstanceUID
    assert [s.SegmentLabel.split(" (")[0] for s in seg.SegmentSequence] == ["whole tumour", "tumour core", "enhancing tumour"]


def test_skull_on_without_a_t1_weighted_series_is_refused(tmp_path):
    from brats_cggm.raw import simulate

    images, _, _ = phantom_images()
    noisy = {m: sitk.Add(images[m], 5.0) for m in ("flair", "t2")}  # a background: not skull-stripped
    simulate.write_examination(noisy, tmp_path / "v", dicom=False)
    with pytest.raises(InconsistentCase, match=r"no T1-weighted sequence \(T1 or T1ce\): deepbet cannot extract the brain"):
        Ingest("v", tmp_path / "v").run()


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    arrays = {m: np.ones((4, 4, 4), np.float32) for m in ("flair", "t1ce")}
    case = IngestedCase("visit", tmp_path, arrays, np.eye(4), "t1ce", None, None, None, np.ones((4, 4, 4), bool), None,
                        {"case_id": "visit"})
    calls = []

    def failing_save(image, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        image.to_filename(path)

    monkeypatch.setattr(nib, "save", failing_save)
    with pytest.raises(OSError):
        write_case(case, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    write_exam(tmp_path / "visit", sequences=("t1ce", "flair"))
    for path in sorted((tmp_path / "visit" / "series_03").iterdir())[4:6]:
        path.unlink()
    code, text = cli("ingest", tmp_path / "visit", "--out", tmp_path / "out")
    assert code == 2 and "failed: " in text and "(a slice missing?)" in text
    assert not (tmp_path / "out" / "visit").exists()
