"""`brats-cggm check` and the loaders' validation: every bad input gets its own one-line
error naming the file, and nothing crashes."""

import gzip
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from data_cases import write_case, write_msd

from brats_cggm.data.layouts import LAYOUTS, detect_layout, discover
from brats_cggm.data.phantom import write_phantoms
from brats_cggm.data.splits import load_split, make_split, save_split
from brats_cggm.data.validation import inspect_case, validate_case
from brats_cggm.errors import BadInputFile, ConfigurationError, InconsistentCase

SHAPE = (24, 28, 20)


@pytest.fixture
def good(tmp_path):
    """Three small phantom cases; each corruption below breaks one file of case 00001."""
    root = tmp_path / "data"
    write_phantoms(root, 3, size=SHAPE, layout="brats2021", seed=5)
    return root


def affine_of(root):
    return nib.load(case_file(root, "t1")).affine


def only_case(root):
    found = discover(root)
    assert not found.problems
    (case,) = [c for c in found.cases if c.case_id == "BraTS2021_00001"]
    return case


def problems_of(root):
    found = discover(root)
    lines = [str(p) for p in found.problems]
    for case in found.cases:
        lines += [str(p) for p in inspect_case(case).problems]
    return lines


def test_good_cases_have_no_problems(good):
    found = discover(good)
    assert found.layout == "brats2021" and len(found.cases) == 3
    report = inspect_case(found.cases[0])
    assert report.ok and report.shape == SHAPE and report.orientation == "LPS"
    assert set(report.label_values) <= {0, 1, 2, 4} and 2 in report.label_values
    assert report.spacing == (10.0, round(240 / 28, 3), 7.75)  # the phantom keeps BraTS's field of view
    validate_case(found.cases[0])


def case_file(root, part):
    return root / "BraTS2021_00001" / LAYOUTS["brats2021"].file_name("BraTS2021_00001", part)


def corrupt_truncated(root):
    path = case_file(root, "t1")
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return path, "truncated"


def corrupt_not_nifti(root):
    path = case_file(root, "t2")
    path.write_bytes(gzip.compress(b"this is a text file, not an image\n" * 20))
    return path, "not a NIfTI"


def corrupt_shape(root):
    path = case_file(root, "t1ce")
    nib.save(nib.Nifti1Image(np.ones((28, 24, 20), np.float32), affine_of(root)), path)
    return path, "shape (28, 24, 20) differs"


def corrupt_affine(root):
    path = case_file(root, "flair")
    shifted = affine_of(root).copy()
    shifted[:3, 3] += 2.0
    nib.save(nib.Nifti1Image(np.asanyarray(nib.load(path).dataobj), shifted), path)
    return case_file(root, "t1"), "affine differs"


def corrupt_nan(root):
    path = case_file(root, "t2")
    data = np.asanyarray(nib.load(path).dataobj).astype(np.float32)
    data[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(data, affine_of(root)), path)
    return path, "1 NaN/Inf voxel(s) in the t2 sequence"


def corrupt_zero(root):
    path = case_file(root, "t1")
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), affine_of(root)), path)
    return path, "t1 sequence is all zero"


def corrupt_missing(root):
    path = case_file(root, "t1ce")
    path.unlink()
    return root / "BraTS2021_00001" / "BraTS2021_00001", "missing sequence file(s) BraTS2021_00001_t1ce.nii.gz"


def corrupt_labels(root):
    path = case_file(root, "seg")
    data = np.asanyarray(nib.load(path).dataobj).copy()
    data[data == 2] = 3
    nib.save(nib.Nifti1Image(data, affine_of(root)), path)
    return path, "label values [3] are not in the brats2021 scheme"


def corrupt_label_grid(root):
    path = case_file(root, "seg")
    data = np.zeros((24, 28, 21), np.uint8)
    nib.save(nib.Nifti1Image(data, affine_of(root)), path)
    return path, "label map shape (24, 28, 21) differs"


def corrupt_2d(root):
    path = case_file(root, "flair")
    nib.save(nib.Nifti1Image(np.ones((24, 28), np.float32), np.eye(4)), path)
    return path, "expected a 3-D flair image, got 2-D"


def corrupt_5d(root):
    path = case_file(root, "t2")
    nib.save(nib.Nifti1Image(np.ones((*SHAPE, 1, 2), np.float32), affine_of(root)), path)
    return path, "expected a 3-D t2 image, got 5-D"


def corrupt_duplicate(root):
    folder = root / "copy" / "BraTS2021_00001"
    folder.mkdir(parents=True)
    for part in ("flair", "t1", "t1ce", "t2"):
        (folder / case_file(root, part).name).write_bytes(case_file(root, part).read_bytes())
    return folder, "duplicate case BraTS2021_00001"


CORRUPTIONS = [
    corrupt_truncated, corrupt_not_nifti, corrupt_shape, corrupt_affine, corrupt_nan, corrupt_zero,
    corrupt_missing, corrupt_labels, corrupt_label_grid, corrupt_2d, corrupt_5d, corrupt_duplicate,
]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.removeprefix("corrupt_"))
def test_each_bad_input_gets_its_own_one_line_error_naming_the_file(good, corrupt):
    path, expected = corrupt(good)
    lines = problems_of(good)
    assert lines, "the problem was not detected"
    matching = [line for line in lines if expected in line]
    assert matching, lines
    assert all("\n" not in line for line in lines)
    assert any(str(path) in line for line in matching), (path, matching)
    # the loaders raise the same error for that case
    found = discover(good)
    broken = [c for c in found.cases if c.case_id == "BraTS2021_00001" and str(c.images[0].parent) in str(path)]
    for case in broken:
        with pytest.raises((BadInputFile, InconsistentCase)):
            validate_case(case)


def test_check_cli_prints_a_table_and_exits_by_outcome(good):
    command = [sys.executable, "-c", "from brats_cggm.cli import main; main()", "check", str(good)]
    ok = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "BraTS2021_00002" in ok.stdout and "all 3 case(s) are fine" in ok.stdout
    corrupt_nan(good)
    corrupt_missing(good)
    bad = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stdout + bad.stderr
    assert "1 of 3 case(s) have problems" in bad.stdout.replace("\n", " ")


def test_check_cli_names_a_folder_without_cases(tmp_path):
    command = [sys.executable, "-c", "from brats_cggm.cli import main; main()", "check", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no BraTS cases found" in result.stderr and str(tmp_path) in result.stderr.replace("\n", "")


def test_layouts_are_detected_and_map_to_the_canonical_order(tmp_path):
    write_case(tmp_path / "b23", "BraTS-GLI-00002-000", "brats2023", seed=1)
    found = discover(tmp_path / "b23")
    assert found.layout == "brats2023"
    assert [p.name.split("-")[-1] for p in found.cases[0].images] == ["t2f.nii.gz", "t1n.nii.gz", "t1c.nii.gz", "t2w.nii.gz"]
    assert found.cases[0].label_scheme == "brats2023" and inspect_case(found.cases[0]).ok
    write_msd(tmp_path / "msd", ["BRATS_001", "BRATS_002"], channel_names=("T2w", "FLAIR", "t1gd", "T1w"))
    msd = discover(tmp_path / "msd")
    assert msd.layout == "msd" and [c.case_id for c in msd.cases] == ["BRATS_001", "BRATS_002"]
    assert msd.cases[0].channels == (1, 3, 2, 0)  # flair, t1, t1ce, t2 in that file
    assert msd.cases[1].label is None  # listed under "test": valid for inference
    assert all(inspect_case(c).ok for c in msd.cases)
    write_case(tmp_path / "mixed", "BraTS2021_00003", "brats2021", seed=2)
    write_case(tmp_path / "mixed", "BraTS-GLI-00004-000", "brats2023", seed=3)
    with pytest.raises(InconsistentCase, match="several layouts"):
        detect_layout(tmp_path / "mixed")
    assert len(discover(tmp_path / "mixed", "brats2023").cases) == 1


def test_cases_without_a_label_are_valid(tmp_path):
    write_case(tmp_path, "BraTS2021_00009", "brats2021", seed=0, label=False)
    (case,) = discover(tmp_path).cases
    assert case.label is None and inspect_case(case).ok


def test_a_broken_msd_manifest_is_named(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"training": []}))
    with pytest.raises(BadInputFile, match="dataset.json: not a valid MSD dataset.json"):
        discover(tmp_path)


def test_splits_are_deterministic_disjoint_and_checked(tmp_path):
    ids = [f"case{i}" for i in range(11)]
    split = make_split(ids, folds=5, seed=3)
    assert split == make_split(list(reversed(ids)), folds=5, seed=3)
    assert split != make_split(ids, folds=5, seed=4)
    vals = [c for fold in split["folds"] for c in fold["val"]]
    assert sorted(vals) == sorted(ids)
    for fold in split["folds"]:
        assert not set(fold["train"]) & set(fold["val"]) and len(fold["train"]) + len(fold["val"]) == 11
    ratio = make_split(ids, val_fraction=0.2, seed=0)
    assert len(ratio["folds"]) == 1 and len(ratio["folds"][0]["val"]) == 2
    path = save_split(split, tmp_path / "split.json")
    assert load_split(path, ids) == split
    with pytest.raises(BadInputFile, match="not in the data, e.g. case0"):
        load_split(path, ids[1:])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(BadInputFile, match="bad.json: not a split file"):
        load_split(tmp_path / "bad.json")
    with pytest.raises(ConfigurationError):
        make_split(ids, folds=12)
