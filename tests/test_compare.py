"""The comparison harness on a tiny configuration, and the baselines it newly runs."""

import csv
import json
import math
import subprocess
import sys

import pytest

from multimodal_general.balance import BalancerSpec
from multimodal_general.errors import ConfigurationError
from multimodal_general.experiments.imbalance_comparison import compare, parse_methods
from multimodal_general.training.imbalance import RunConfig, build, train_and_evaluate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = {"epochs": 1, "train_size": 256, "val_size": 128, "test_size": 128}


def test_compare_writes_runs_tables_plot_and_resumes(tmp_path):
    out = tmp_path / "cmp"
    first = compare("cls2", "none,cggm-stable", seeds=2, out=out, **TINY)
    runs = sorted(p.name for p in (out / "runs").glob("*.json"))
    steps = list(csv.DictReader((out / "runs" / "cggm-stable-seed0.telemetry.csv").open()))
    assert len(steps) == 256 // 64 and {"B/easy", "B/slow", "eps/easy", "grad_norm/slow"} <= set(steps[0])
    assert runs == ["cggm-stable-seed0.json", "cggm-stable-seed1.json", "none-seed0.json", "none-seed1.json"]
    assert sorted(first.computed) == [("cggm-stable", 0), ("cggm-stable", 1), ("none", 0), ("none", 1)]
    assert not first.skipped and not first.not_applicable
    saved = json.loads((out / "runs" / "none-seed1.json").read_text())
    assert saved["settings"]["test_seed"] != saved["settings"]["seed"]
    assert set(saved["result"]["probe"]) == {"easy", "slow"} and set(saved["result"]["head"]) == {"easy", "slow"}
    assert 0.0 <= saved["result"]["test_metric"] <= 1.0 and saved["result"]["best_epoch"] == 0

    report = (out / "results.md").read_text()
    assert "| none | " in report and "| cggm-stable | " in report and "test accuracy" in report
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == ["none", "cggm-stable"]
    for row in rows:
        assert row["status"] == "ok" and row["runs"] == "2" and row["diverged"] == "0"
        assert math.isfinite(float(row["metric_mean"])) and float(row["wall_s_mean"]) > 0
    assert (out / "results.png").read_bytes().startswith(b"\x89PNG")
    assert not list(out.rglob(".*.tmp"))

    # resume: only the deleted pair is recomputed, the others are read back untouched
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    (out / "runs" / "none-seed1.json").unlink()
    second = compare("cls2", "none,cggm-stable", seeds=2, out=out, **TINY)
    assert second.computed == [("none", 1)]
    assert sorted(second.skipped) == [("cggm-stable", 0), ("cggm-stable", 1), ("none", 0)]
    for name, mtime in kept.items():
        if name != "none-seed1.json":
            assert (out / "runs" / name).stat().st_mtime_ns == mtime
    again = json.loads((out / "runs" / "none-seed1.json").read_text())
    assert again["result"]["test_metric"] == saved["result"]["test_metric"]  # same seed, same numbers

    # a different budget in the same folder is refused, not silently mixed
    with pytest.raises(ConfigurationError, match="other settings"):
        compare("cls2", "none", seeds=1, out=out, **{**TINY, "train_size": 320})


def test_a_method_that_cannot_serve_the_task_is_reported_not_applicable(tmp_path):
    outcome = compare("reg2", ["none", "agm"], seeds=2, out=tmp_path, **TINY)
    assert set(outcome.not_applicable) == {"agm"} and "classification" in outcome.not_applicable["agm"]
    assert sorted(outcome.computed) == [("none", 0), ("none", 1)]
    report = (tmp_path / "results.md").read_text()
    assert "| agm | not applicable: agm supports classification and segmentation only" in report
    assert "test MAE" in report
    assert not list((tmp_path / "runs").glob("agm-*"))


def test_unknown_or_repeated_methods_are_refused():
    assert parse_methods("none, cggm-paper ,ogm_ge") == ["none", "cggm-paper", "ogm_ge"]
    for bad in ("none,bogus", "cggm-nope", "none,none", ""):
        with pytest.raises(ConfigurationError):
            parse_methods(bad)


def test_cli_unknown_method_is_one_line_and_exit_2(tmp_path):
    out = tmp_path / "never"
    code = (
        "import sys; sys.argv=['x', 'compare', '--methods', 'none,bogus', '--out', %r];"
        " from multimodal_general.cli import main; main()" % str(out)
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown method 'bogus'" in lines[0]
    assert not out.exists()  # nothing ran


@pytest.mark.parametrize("balancer", ["ogm_ge", "modality_dropout"])
def test_ogm_ge_and_modality_dropout_now_run_on_cls2(balancer):
    result = train_and_evaluate(RunConfig(task="cls2", balancer=BalancerSpec(balancer), epochs=1, train_size=320, val_size=200))
    assert math.isfinite(result["fused_acc"]) and len(result["telemetry"]) == 5
    last = result["telemetry"][-1]
    if balancer == "ogm_ge":
        assert {"coef/easy", "coef/slow", "ratio/easy"} <= set(last)
    else:
        kept = [row["kept/easy"] for row in result["telemetry"]]
        assert all(0.0 < k < 1.0 for k in kept)  # the loop really dropped features


def test_fusion_head_choice():
    model, _, _ = build(RunConfig(balancer=BalancerSpec("ogm_ge")))
    assert model.last_layer is model.head  # "auto": ogm_ge gets the single linear fused layer
    model, _, _ = build(RunConfig(balancer=BalancerSpec("ogm_ge"), fusion_head="mlp"))
    assert model.last_layer is model.head[-1]  # an explicit choice is kept (OGM-GE then refuses it)
    model, _, _ = build(RunConfig(balancer=BalancerSpec("none")))
    assert model.last_layer is model.head[-1]  # the default stays the two-layer head
    model, _, _ = build(RunConfig(balancer=BalancerSpec("none"), fusion_head="linear"))
    assert model.last_layer is model.head
    with pytest.raises(ConfigurationError):
        build(RunConfig(fusion_head="bogus"))


def test_balancer_options_reach_the_methods_that_declare_them(tmp_path):
    """--balancer-option: OGM-GE's alpha changes its run (and is recorded), joint training
    ignores it; a name no balancer declares is refused before anything runs."""
    plain = compare("cls2", "none,ogm_ge", seeds=1, out=tmp_path / "a", **TINY, plot=False)
    tuned = compare("cls2", "none,ogm_ge", seeds=1, out=tmp_path / "b", **TINY, plot=False,
                    balancer_options={"alpha": 5.0})
    by_method = lambda outcome: {r["method"]: r["metric"][0] for r in outcome.rows}  # noqa: E731
    assert by_method(plain)["none"] == by_method(tuned)["none"]
    assert by_method(plain)["ogm_ge"] != by_method(tuned)["ogm_ge"]
    saved = json.loads((tmp_path / "b" / "runs" / "ogm_ge-seed0.json").read_text())
    assert saved["settings"]["balancer_options"] == {"alpha": 5.0}
    assert "--balancer-option alpha=5.0" in (tmp_path / "b" / "results.md").read_text()
    result = subprocess.run(
        [sys.executable, "-c", "from multimodal_general.cli import main; main()", "compare", "--task", "cls2",
         "--methods", "none", "--out", str(tmp_path / "c"), "--balancer-option", "alpah=5"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and "unknown balancer option(s): ['alpah']" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "c").exists()
