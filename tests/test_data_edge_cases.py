"""Edge cases found in review: each gets one clear error, or works."""

import json
import os
import pickle
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from brats_cggm.data.dataset import make_dataset
from brats_cggm.data.layouts import discover
from brats_cggm.data.phantom import write_phantoms
from brats_cggm.data.transforms import PreprocessConfig, train_transforms
from brats_cggm.data.validation import inspect_case
from brats_cggm.errors import BadInputFile, InconsistentCase
from multimodal_general.errors import OutputError
from multimodal_general.io import atomic_write_text

SIZE = 24


@pytest.fixture
def data(tmp_path):
    write_phantoms(tmp_path / "data", 2, size=SIZE, seed=4)
    return tmp_path / "data"


def cli(*args):
    return subprocess.run(
        [sys.executable, "-c", "from brats_cggm.cli import main; main()", *map(str, args)],
        capture_output=True, text=True, timeout=120,
    )


def test_linked_case_folders_are_found_and_hidden_files_ignored(data, tmp_path):
    linked = tmp_path / "subset"
    linked.mkdir()
    for case in sorted(data.iterdir()):
        (linked / case.name).symlink_to(case)
    (linked / "._BraTS2021_00000_flair.nii.gz").write_bytes(b"\0\5\26\7")  # a macOS fork
    found = discover(linked)
    assert [c.case_id for c in found.cases] == ["BraTS2021_00000", "BraTS2021_00001"] and not found.problems
    assert all(str(c.images[0]).startswith(str(linked)) for c in found.cases)


def test_no_cases_is_an_error_not_success(tmp_path):
    result = cli("check", tmp_path / "missing", "--layout", "brats2021")
    assert result.returncode == 2 and "is not a folder" in result.stderr
    (tmp_path / "empty").mkdir()
    result = cli("check", tmp_path / "empty", "--layout", "brats2021")
    assert result.returncode == 2 and "no brats2021 cases found" in result.stderr


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
        (lambda p: p.write_bytes(b"\x5c\x01\x00\x00" + bytes(400)), "is named .gz but is not gzip-compressed"),
        (lambda p: (p.unlink(), p.mkdir()), "is a folder, not a NIfTI file"),
    ],
    ids=["empty", "not-gzip", "folder"],
)
def test_unreadable_files_say_why(data, make, message):
    case = discover(data).cases[0]
    make(case.images[1])
    lines = [str(p) for p in inspect_case(case).problems]
    assert any(message in line and str(case.images[1]) in line for line in lines), lines


def test_a_4d_sequence_is_a_problem_as_the_loader_cannot_stack_it(data):
    case = discover(data).cases[0]
    flair = nib.load(case.images[0])
    nib.save(nib.Nifti1Image(np.asanyarray(flair.dataobj)[..., None], flair.affine), case.images[0])
    lines = [str(p) for p in inspect_case(case).problems]
    assert any("expected a 3-D flair image, got 4-D" in line for line in lines), lines


def test_msd_manifests_with_wrong_types_are_named(tmp_path):
    write_phantoms(tmp_path, 2, size=SIZE, layout="msd", seed=1)
    manifest = json.loads((tmp_path / "dataset.json").read_text())
    manifest["training"][0]["image"] = None
    (tmp_path / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(BadInputFile, match="dataset.json: not a valid MSD dataset.json"):
        discover(tmp_path)
    manifest["training"][0]["image"] = manifest["training"][1]["image"]
    manifest["modality"]["4"] = "t1"
    (tmp_path / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(BadInputFile, match="names t1 twice"):
        discover(tmp_path)


def test_user_errors_survive_pickling_and_dataloader_workers():
    error = BadInputFile("/data/x_seg.nii.gz", "label values [3] are not in the scheme")
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is BadInputFile and str(clone) == str(error) and clone.path == error.path
    rebuilt = InconsistentCase("Caught in worker\nTraceback...\n/data/case: shape differs")  # torch's re-raise
    assert str(rebuilt) == "/data/case: shape differs" and rebuilt.problem == "shape differs"


def test_a_case_without_label_cannot_train(tmp_path):
    write_phantoms(tmp_path, 1, size=SIZE, seed=2)
    (case,) = discover(tmp_path).cases
    case.label.unlink()
    (case,) = discover(tmp_path).cases
    cfg = PreprocessConfig(spacing=(10.0, 10.0, 155 / SIZE), patch_size=(8, 8, 8))
    with pytest.raises(InconsistentCase, match="has no label map"):
        make_dataset([case], train_transforms(cfg))


def test_outputs_that_cannot_be_written_are_one_line_errors(tmp_path):
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(OutputError, match="folder.json: cannot write"):
        atomic_write_text(tmp_path / "folder.json", "{}")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="cannot write"):
        atomic_write_text(tmp_path / "afile" / "split.json", "{}")
    assert sorted(os.listdir(tmp_path)) == ["afile", "folder.json"]  # no temporary file left
    result = cli("phantom", "--out", tmp_path / "afile", "--cases", "1", "--size", "16")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "cannot write" in result.stderr
