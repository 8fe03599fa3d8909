"""``brats-cggm compare``: every method x seed at the tiny configuration, selected on validation,
scored on held-out phantoms; resume, pinned settings and bad input."""

from __future__ import annotations

import csv
import json
import sys

import pytest
from training_cases import TINY, torch_threads

from brats_cggm import cli
from brats_cggm.compare import METHODS, compare, early_fusion_overrides, parse_methods
from brats_cggm.data.phantom import write_phantoms
from brats_cggm.errors import ConfigurationError
from brats_cggm.training import Trainer

SHARED = {**TINY, "optim.epochs": 1, "validation.every": 1}


def quiet(line: str) -> None:
    pass


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    with torch_threads(1):
        root = tmp_path_factory.mktemp("compare")
        write_phantoms(root / "data", 6, size=32, layout="brats2021", seed=0)
        write_phantoms(root / "test", 3, size=32, layout="brats2021", seed=1)
        out = root / "out"
        runs = compare(root / "data", "none,agm,early_fusion", 2, out, test_data=root / "test", settings=SHARED,
                       report=quiet)
        yield root, out, runs


def test_every_method_and_seed_is_trained_selected_and_scored_on_the_held_out_cases(comparison):
    _, out, runs = comparison
    assert [(r["method"], r["seed"]) for r in runs] == [
        (m, s) for s in (0, 1) for m in ("none", "agm", "early_fusion")]
    for run in runs:
        run_dir = out / "runs" / f"{run['method']}-seed{run['seed']}"
        config = yaml_config(out, run_dir.name)
        assert config["seed"] == run["seed"] and config["optim"]["epochs"] == 1
        test = json.loads((run_dir / "evaluation" / "all" / "summary.json").read_text())
        assert test["cases"] == 3 and run["test_cases"] == 3  # every held-out case, none of the training ones
        assert run["test_dice/WT"] == test["metrics"]["dice/WT"]["mean"]
    agm = yaml_config(out, "agm-seed0")
    assert agm["balancer"]["name"] == "agm"
    early = yaml_config(out, "early_fusion-seed0")
    assert early["network"]["preset"] == "early_fusion"
    assert early["network"]["overrides"] == {"channels": [4, 8, 8], "strides": [2, 2], "num_res_units": 1}


def yaml_config(out, name):
    import yaml

    return yaml.safe_load((out / "runs" / name / "config.yaml").read_text())


def test_the_report_holds_one_row_per_method_with_mean_and_spread(comparison):
    _, out, runs = comparison
    report = (out / "results.md").read_text()
    for method in ("none", "agm", "early_fusion"):
        assert f"| {method} (2 seeds) |" in report
    assert "brats-cggm compare" in report
    rows = {row["method"]: row for row in csv.DictReader((out / "results.csv").open())}
    agm = [r for r in runs if r["method"] == "agm"]
    mean = sum(r["test_dice/mean"] for r in agm) / 2
    assert float(rows["agm"]["test_dice/mean_mean"]) == pytest.approx(mean, rel=1e-5)
    assert rows["early_fusion"]["head/flair_mean"] == ""  # no per-sequence heads
    assert (out / "results.png").read_bytes().startswith(b"\x89PNG")
    payload = json.loads((out / "results.json").read_text())
    assert len(payload["runs"]) == 6 and [m["method"] for m in payload["methods"]] == ["none", "agm", "early_fusion"]


def test_every_run_keeps_its_per_case_rows_and_each_method_is_paired_with_the_first(comparison):
    from multimodal_general.experiments.paired import case_means, paired_difference

    _, out, runs = comparison
    for run in runs:
        kept = json.loads((out / "scores" / f"{run['method']}-seed{run['seed']}.json").read_text())
        assert [c["case_id"] for c in kept["cases"]] == [c["case_id"] for c in run["cases"]] and len(kept["cases"]) == 3
        assert {"dice/WT", "hd95/ET"} <= set(kept["cases"][0])
    payload = json.loads((out / "results.json").read_text())
    assert payload["reference"] == "none" and sorted(payload["paired"]) == ["agm", "early_fusion"]

    def wt(method):  # a case's WT Dice averaged over the seeds first
        return case_means([{c["case_id"]: c["dice/WT"] for c in r["cases"]} for r in runs if r["method"] == method])

    expected = paired_difference(wt("agm"), wt("none"))
    assert payload["paired"]["agm"]["dice/WT"] == pytest.approx(expected)
    assert payload["paired"]["agm"]["hd95/TC"]["n"] == 3
    report = (out / "results.md").read_text()
    assert "Paired against none" in report and "| agm | 3 |" in report and "intervals are wide" in report
    rows = {row["method"]: row for row in csv.DictReader((out / "results.csv").open())}
    assert float(rows["agm"]["vs_ref/dice/WT_mean"]) == pytest.approx(expected["mean"], abs=1e-6)
    assert rows["none"]["vs_ref/dice/WT_mean"] == ""  # the reference itself
    assert (out / "paired.png").read_bytes().startswith(b"\x89PNG")


def test_the_reference_is_an_option_and_must_be_a_compared_method(comparison, monkeypatch):
    root, out, runs = comparison
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("a finished run was trained again"))
    compare(root / "data", "none,agm,early_fusion", 2, out, test_data=root / "test", settings=SHARED, report=quiet,
            reference="agm")
    payload = json.loads((out / "results.json").read_text())
    assert payload["reference"] == "agm" and sorted(payload["paired"]) == ["early_fusion", "none"]
    assert "--reference agm" in payload["command"]
    with pytest.raises(ConfigurationError, match="--reference 'cggm'"):
        compare(root / "data", "none", 1, out, test_data=root / "test", settings=SHARED, report=quiet,
                reference="cggm")
    compare(root / "data", "none,agm,early_fusion", 2, out, test_data=root / "test", settings=SHARED, report=quiet)


def test_a_rerun_reuses_finished_runs_and_refuses_other_settings(comparison, monkeypatch):
    root, out, runs = comparison

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(Trainer, "fit", no_training)
    again = compare(root / "data", "none,agm,early_fusion", 2, out, test_data=root / "test", settings=SHARED,
                    report=quiet)
    assert again == runs
    with pytest.raises(ConfigurationError, match="other settings"):
        compare(root / "data", "none", 1, out, test_data=root / "test", settings={**SHARED, "optim.epochs": 2},
                report=quiet)


def test_methods_are_checked_before_anything_runs(tmp_path, monkeypatch, capsys):
    assert parse_methods("all") == list(METHODS)
    with pytest.raises(ConfigurationError, match="ogm_ge"):
        parse_methods("none,ogm_ge")
    assert early_fusion_overrides("cpu-small", {}) == {"channels": [8, 16, 32, 64], "strides": [2, 2, 2],
                                                      "num_res_units": 1}
    monkeypatch.setattr(sys, "argv", ["brats-cggm", "compare", "--data", str(tmp_path), "--out", str(tmp_path / "out"),
                                      "--methods", "none,cgm"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown method 'cgm'")
    assert not (tmp_path / "out").exists()


def test_data_without_test_cases_is_refused_before_anything_is_written(comparison):
    root, _, _ = comparison
    with pytest.raises(ConfigurationError, match="none is left to test on"):
        compare(root / "data", "none", 1, root / "no_test", settings=SHARED, report=quiet)
    assert not (root / "no_test").exists()


def test_scoring_with_subsets_adds_their_average_and_the_worst_one(comparison):
    from brats_cggm.compare import SUBSET_KEYS, aggregate, markdown, score_run

    root, out, runs = comparison
    run = score_run(out / "runs" / "early_fusion-seed0", "early_fusion", 0, root / "test", "cpu", quiet, subsets=True)
    summary = json.loads((out / "runs" / "early_fusion-seed0" / "evaluation" / "all" / "summary.json").read_text())
    assert run["subsets_dice/WT"] == pytest.approx(summary["subsets"]["average"]["dice/WT"])
    assert run["worst_subset"] in summary["subsets"]["subsets"] and 0 <= run["worst_subset_dice/mean"] <= 1
    full = next(r for r in runs if (r["method"], r["seed"]) == ("early_fusion", 0))
    assert run["test_dice/WT"] == full["test_dice/WT"]  # the full-set scores stay those of the run
    rows = aggregate([run], ["early_fusion"])
    assert all(key in rows[0] for key in SUBSET_KEYS)
    assert "15-subset WT" in markdown(rows, "cmd", root / "test")
    # each case carries its own 15-subset average, to be paired case by case
    for case in run["cases"]:
        assert 0 <= case["subsets_dice/mean"] <= 1
    mean_of_cases = sum(case["subsets_dice/WT"] for case in run["cases"]) / len(run["cases"])
    assert mean_of_cases == pytest.approx(run["subsets_dice/WT"], abs=1e-6)


def test_each_case_s_subset_average_is_over_its_subsets_and_its_finite_scores(tmp_path):
    from brats_cggm.compare import case_subset_means

    table = tmp_path / "subsets.csv"
    table.write_text("case_id,subset,dice/TC,dice/WT,dice/ET\n"
                     "a,flair,0.2,0.6,\n"  # no ET score for this subset
                     "a,t1,0.4,0.8,0.3\n"
                     "b,flair,1.0,1.0,1.0\n")
    means = case_subset_means(table)
    assert means["a"] == pytest.approx({"subsets_dice/TC": 0.3, "subsets_dice/WT": 0.7, "subsets_dice/ET": 0.3,
                                        "subsets_dice/mean": (0.3 + 0.7 + 0.3) / 3})
    assert means["b"]["subsets_dice/mean"] == 1.0


def test_early_fusion_with_sequence_dropout_is_a_method_of_its_own():
    from brats_cggm.compare import method_overrides

    overrides = method_overrides("early_fusion_dropout", {"network.fusion": "hemis"}, "cpu-real")
    assert overrides["network.preset"] == "early_fusion" and overrides["network.sequence_dropout"] == 0.25
    assert overrides["network.fusion"] == "mean"  # one U-Net over stacked sequences has no branches to fuse


def test_a_fixed_budget_scores_the_last_checkpoint_and_is_pinned(comparison):
    from brats_cggm.compare import score_run

    root, out, _ = comparison
    run_dir = out / "runs" / "none-seed1"
    last = score_run(run_dir, "none", 1, root / "test", "cpu", quiet, checkpoint="last")
    summary = json.loads((run_dir / "evaluation" / "all" / "summary.json").read_text())
    assert summary["checkpoint"].endswith("last.pt") and last["checkpoint"] == "last"
    assert len(last["cases"]) == 3
    best = score_run(run_dir, "none", 1, root / "test", "cpu", quiet)  # evaluated again, from best.pt
    assert best["checkpoint"] == "best"
    assert json.loads((run_dir / "evaluation" / "all" / "summary.json").read_text())["checkpoint"].endswith("best.pt")
    with pytest.raises(ConfigurationError, match="other settings"):  # a folder holds one protocol
        compare(root / "data", "none", 1, out, test_data=root / "test", settings=SHARED, report=quiet,
                checkpoint="last")
    with pytest.raises(ConfigurationError, match="--checkpoint"):
        compare(root / "data", "none", 1, out, test_data=root / "test", settings=SHARED, report=quiet,
                checkpoint="first")


def test_the_command_line_refuses_an_unknown_checkpoint_or_reference_before_anything_is_written(tmp_path, monkeypatch,
                                                                                                capsys):
    for option, value, message in (("--checkpoint", "first", "error: --checkpoint must be one of best, last"),
                                   ("--reference", "agm", "error: --reference 'agm' is not one of the methods")):
        monkeypatch.setattr(sys, "argv", ["brats-cggm", "compare", "--data", str(tmp_path), "--out",
                                          str(tmp_path / "out"), "--methods", "none,cggm", option, value])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message)
        assert not (tmp_path / "out").exists()
