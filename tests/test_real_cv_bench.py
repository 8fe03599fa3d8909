"""bench/real_cv.py's pieces that decide what is compared: folds by source and the rows."""

import importlib.util
import itertools
import sys
from pathlib import Path

import pytest

from brats_cggm import models
from brats_cggm.compare import METHODS
from brats_cggm.network.fusion import FUSIONS

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("real_cv", REPO / "bench" / "real_cv.py")
real_cv = sys.modules["real_cv"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(real_cv)

#: made-up ids in BraTS 2018's form: six sources of 3, 3, 2, 2, 1, 1 cases
CASES = [f"Brats18_{source}_{i}_1" for source, n in
         [("CBICA", 3), ("TCIA01", 3), ("TCIA02", 2), ("2013", 2), ("TCIA03", 1), ("TCIA10", 1)] for i in range(n)]


def test_the_source_is_read_from_the_case_id():
    assert real_cv.source_of("Brats18_TCIA01_201_1") == "TCIA01"
    assert real_cv.source_of("Brats18_2013_7_1") == "2013"
    assert real_cv.source_of("BraTS2021_00012") == "BraTS2021_00012"  # another form: its own source


def test_folds_split_by_source_and_every_case_is_tested_once():
    folds = real_cv.source_folds(CASES, 3)["folds"]
    tested = [c for fold in folds for c in fold["test"]]
    assert sorted(tested) == sorted(CASES)
    for a, b in itertools.combinations(folds, 2):
        assert not {real_cv.source_of(c) for c in a["test"]} & {real_cv.source_of(c) for c in b["test"]}
    assert sorted(len(f["test"]) for f in folds) == [4, 4, 4]  # largest source first, to the emptiest fold
    for fold in folds:
        rest = sorted(set(CASES) - set(fold["test"]))
        assert fold["val"] == rest[:1] and fold["train"] == rest[1:]


def test_more_folds_than_sources_is_refused():
    with pytest.raises(SystemExit, match="2 source"):
        real_cv.source_folds(["Brats18_A_1_1", "Brats18_B_1_1"], 3)


def test_every_row_is_a_method_that_exists_and_rows_share_runs_only_when_identical():
    trained = {key: row for key, row in real_cv.ROWS.items() if row.fusion is not None}
    for row in trained.values():
        assert row.method in METHODS and row.fusion in FUSIONS
        assert row.init is None or row.init in real_cv.PRETRAIN
    runs = [(row.group, row.method) for row in trained.values()]
    assert len(runs) == len(set(runs))  # no two rows write the same run folder
    for row in real_cv.ROWS.values():
        if row.fusion is None:  # a scored model: a shipped model or a phantom pre-training
            assert (row.method in {m.name for m in models.available()}
                    or (row.method == real_cv.PRETRAINED and row.init in real_cv.PRETRAIN)), row.method
