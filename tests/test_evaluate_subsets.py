"""``brats-cggm evaluate --subsets``: every non-empty subset of the sequences scored as a
missing sequence is predicted, the table's average and worst subset, and the command line."""

from __future__ import annotations

import csv
import itertools
import statistics

import pytest
import torch
from training_cases import CPU, run_cli, tiny_config, torch_threads

from brats_cggm import MODALITIES
from brats_cggm.data.layouts import Case, discover
from brats_cggm.data.phantom import write_phantoms
from brats_cggm.errors import IncompatibleModel
from brats_cggm.evaluation import (
    SUBSETS,
    evaluate,
    reference_regions,
    score_case,
    subset_name,
    subset_table,
)
from brats_cggm.inference.segmenter import Segmenter
from brats_cggm.metrics import REGIONS, region_metrics
from brats_cggm.training import Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One epoch of the tiny configuration without sequence dropout (6 phantoms, 2 validate)."""
    with torch_threads(1):
        root = tmp_path_factory.mktemp("subsets")
        write_phantoms(root / "data", 6, size=32, layout="brats2021", seed=0)
        Trainer(tiny_config(root / "data", optim__epochs=1, validation__every=1), root / "run", CPU,
                report=lambda line: None).fit()
        yield root / "run"


def test_the_fifteen_subsets_are_every_non_empty_one_all_four_first():
    assert len(SUBSETS) == 15 == len(set(SUBSETS))
    assert SUBSETS[0] == MODALITIES and all(len(a) >= len(b) for a, b in itertools.pairwise(SUBSETS))
    assert {frozenset(s) for s in SUBSETS} == {
        frozenset(c) for n in range(1, 5) for c in itertools.combinations(MODALITIES, n)}


def test_a_subset_is_scored_exactly_as_a_case_with_those_sequences_missing(run):
    segmenter = Segmenter.load(run)
    case = discover(run.parent / "data").cases[0]
    row, subsets = score_case(segmenter, case, subsets=True)
    rows = {r["subset"]: r for r in subsets}
    assert {k: v for k, v in rows["flair+t1+t1ce+t2"].items() if k != "subset"} == {
        k: v for k, v in row.items() if k == "case_id" or k.startswith("dice/")}  # the full set is predicted once
    assert list(rows) == [subset_name(s) for s in SUBSETS]
    without_t1 = Case(case.case_id, case.layout, (case.images[0], None, *case.images[2:]), case.label)
    with pytest.raises(IncompatibleModel, match="trained without modality dropout"):
        segmenter.predict_case(without_t1)  # prediction keeps refusing what evaluation scores
    prediction = segmenter.predict_case(without_t1, any_subset=True)
    reference, spacing = reference_regions(case)
    expected = region_metrics(torch.as_tensor(prediction.regions), reference, spacing, hd95=False)
    assert {k: rows["flair+t1ce+t2"][k] for k in expected} == expected


def test_the_table_averages_the_subsets_and_names_the_worst():
    rows = [{"case_id": c, "subset": s, "dice/TC": tc, "dice/WT": wt, "dice/ET": et}
            for c, s, tc, wt, et in [("a", "flair", 0.2, 0.8, 0.1), ("b", "flair", 0.4, 0.6, 0.3),
                                     ("a", "t1", 0.0, 0.1, 0.0), ("b", "t1", 0.2, 0.3, 0.0)]]
    table = subset_table(rows)
    assert table["subsets"]["flair"] == pytest.approx({"dice/TC": 0.3, "dice/WT": 0.7, "dice/ET": 0.2})
    assert table["average"] == pytest.approx({"dice/TC": 0.2, "dice/WT": 0.45, "dice/ET": 0.1})
    assert table["worst"]["subset"] == "t1"


def test_evaluate_with_subsets_writes_the_table_and_the_full_set_matches_the_cases(run):
    rows, summary, folder = evaluate(run, None, "val", "best", "cpu", subsets=True)
    table = summary["subsets"]
    assert list(table["subsets"]) == [subset_name(s) for s in SUBSETS]
    full = table["subsets"]["flair+t1+t1ce+t2"]
    for region in REGIONS:
        assert full[f"dice/{region}"] == pytest.approx(statistics.fmean(r[f"dice/{region}"] for r in rows))
        assert table["average"][f"dice/{region}"] == pytest.approx(
            statistics.fmean(v[f"dice/{region}"] for v in table["subsets"].values()))
    with open(folder / "subsets.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 15 * len(rows)


def test_the_evaluate_command_prints_the_subset_table(run):
    result = run_cli("evaluate", "--run", run, "--subsets")
    assert result.returncode == 0, result.stdout + result.stderr
    for words in ("average of the 15", "worst:", "flair+t1ce", "subsets.csv"):
        assert words in result.stdout, result.stdout
