"""The shipped default model in models/ (trained on real BraTS 2018 cases): it loads (card and
weight digest checked), says what it is, and segments phantom cases, also with a sequence
missing: checks that run on every machine (tests/test_real_cases.py scores it on real scans
where ../shared/data/real exists)."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from inference_cases import cli
from training_cases import run_cli

from brats_cggm import models
from brats_cggm.data.layouts import Case, discover
from brats_cggm.data.phantom import write_phantoms
from brats_cggm.inference.segmenter import Segmenter
from brats_cggm.metrics import REGIONS, region_metrics

DEFAULT_MODEL = models.default().path


@pytest.fixture(scope="module")
def segmenter():
    torch.set_num_threads(1)
    return Segmenter.load()  # the default: models/brats_cggm_real.onnx


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("unseen")
    write_phantoms(root, 2, size=64, layout="brats2021", seed=100)  # the model saw no phantom
    return discover(root).cases


def wt_dice(prediction, case) -> float:
    reference = np.asarray(nib.load(case.label).dataobj)
    regions = torch.as_tensor(prediction.regions)
    truth = torch.as_tensor(np.stack([np.isin(reference, (1, 4)), reference > 0, reference == 4]))
    return region_metrics(regions, truth, [1.0, 1.0, 1.0], hd95=False)["dice/WT"]


def test_the_default_model_is_the_shipped_one_and_says_what_it_is(segmenter):
    assert segmenter.source == str(DEFAULT_MODEL)
    card = segmenter.card
    assert "real BraTS cases" in card["description"] and "NOT for clinical use" in card["description"]
    assert len(card["training"]["ensemble"]["members"]) == 3 and not segmenter.tta and segmenter.postprocessing
    estimate = card["evaluation"]["inference"]["estimate"]  # what users should expect, with its interval
    assert estimate["dice/WT"]["low"] < estimate["dice/WT"]["mean"] < estimate["dice/WT"]["high"]
    assert card["network"]["preset"] == "early_fusion" and card["preprocessing"]["spacing"] == [2.0, 2.0, 2.0]
    assert "not for clinical use" in card["intended_use"]
    assert segmenter.allows_missing  # trained with sequence dropout (its card's old name: modality_dropout)
    assert card["parity"]["max_abs_diff_probabilities"] <= card["parity"]["tolerance"]
    assert DEFAULT_MODEL.stat().st_size < 8 * 2**20  # small enough to ship


def test_it_finds_the_tumour_of_unseen_phantoms(segmenter, cases):
    dice = [wt_dice(segmenter.predict_case(case), case) for case in cases]
    assert np.mean(dice) > 0.5, dice


def test_it_segments_with_a_sequence_missing(segmenter, cases):
    case = cases[0]
    without_t1 = Case(case.case_id, case.layout, (case.images[0], None, *case.images[2:]), case.label)
    prediction = segmenter.predict_case(without_t1)
    assert prediction.sequences_used == ("flair", "t1ce", "t2")
    assert wt_dice(prediction, case) > 0.4


def test_evaluate_scores_the_shipped_model_by_default(segmenter, cases, tmp_path):
    folder = cases[0].label.parent.parent
    result = run_cli("evaluate", "--data", folder, "--out", tmp_path / "scores")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "scores" / "summary.json").read_text())
    assert summary["model"] == str(DEFAULT_MODEL) and summary["cases"] == len(cases)
    expected = np.mean([wt_dice(segmenter.predict_case(case), case) for case in cases])
    assert summary["metrics"]["dice/WT"]["mean"] == pytest.approx(expected, abs=1e-6)
    with open(tmp_path / "scores" / "cases.csv") as handle:  # the classic columns first, then the lesion-wise
        assert next(csv.reader(handle)) == ["case_id", *(
            f"{metric}/{region}" for metric in ("dice", "hd95", "lesion_dice", "lesion_hd95") for region in REGIONS)]
    assert "lesion-wise Dice" in result.stdout and "HD95 374 mm" in result.stdout, result.stdout


@pytest.mark.parametrize("args, words", [
    (("evaluate",), "needs --data DIR"),
    (("evaluate", "--run", "some-run", "--model", "m.onnx"), "--model and --out score an exported model"),
    (("evaluate", "--data", ".", "--split", "val"), "--split picks a run's cases"),
])
def test_evaluate_refuses_options_that_do_not_go_together(args, words):
    # in this process, as the console script runs the app (inference_cases.cli, which also
    # fails on a traceback): a subprocess spends seconds importing torch for each refusal;
    # the console script itself runs in test_evaluate_scores_the_shipped_model_by_default
    code, text = cli(*args)
    assert code == 2 and words in text, text
