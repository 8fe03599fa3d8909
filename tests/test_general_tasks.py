"""End to end: ``multimodal-general train / evaluate / synth`` on tiny synthetic CMU-MOSI,
IEMOCAP and Food-101, the run folder they write, resume, bad input, masks and the loss's
shape check.

The datasets and one run per (task, balancer) are built once per module. The CLI calls run
in-process through :func:`multimodal_general.cli.main` (the code the console script runs,
``SystemExit`` caught; an exception that is not a user error escapes and fails the test);
one call goes through the real ``multimodal-general`` console script in a subprocess (its
start-up alone takes seconds).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import pickle
import shutil
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from training_cases import torch_threads

from multimodal_general.cli import main
from multimodal_general.datasets.iemocap import read_iemocap, write_synthetic_iemocap
from multimodal_general.datasets.metrics import SELECTION, TASK_METRICS
from multimodal_general.datasets.mosi import read_mosi, write_synthetic_mosi
from multimodal_general.datasets.task_data import SequenceBatch
from multimodal_general.experiments.seeds import train_run
from multimodal_general.models.sequence import (
    ModelSize,
    SequenceFusionNet,
    ShapeCheckedLoss,
    task_criterion,
)
from multimodal_general.training.runner import TrainSettings, load_task

MODALITIES = {"mosi": ("text", "audio", "vision"), "iemocap": ("audio", "vision", "text"),
              "food101": ("text", "image")}
SMALL = {"d_model": 8, "layers": 1, "heads": 2, "batch_size": 16}
EPOCHS = {"mosi": 3, "iemocap": 2, "food101": 2}
#: the CGGM runs' options, in the spelling both command lines share (brats-cggm train has them too)
CGGM = {"balancer": "cggm", "cggm_preset": "stable", "rho": 1.2, "lam": 0.1}
SEED_FILES = ("metrics.jsonl", "metrics.csv", "telemetry.csv", "checkpoints/best.pt",
              "checkpoints/last.pt", "plots/balance.png", "plots/validation.png", "test.json")
SCRIPT = Path(sys.executable).with_name("multimodal-general")


# ----------------------------------------------------------------------------- helpers
def cli(*args) -> tuple[int, str, str]:
    """``multimodal-general ARGS`` in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["multimodal-general", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def script(*args, timeout: int = 120) -> subprocess.CompletedProcess:
    """The real console script in a subprocess, one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-c",
                                                     "from multimodal_general.cli import main; main()"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)


def one_line_error(code: int, err: str, *words: str) -> str:
    assert code == 2, err
    message = err.strip()
    assert message.startswith("error:") and "\n" not in message, message
    assert "Traceback" not in err
    for word in words:
        assert word in message, message
    return message


def train_args(task: str, data: Path, out: Path, data_sets: dict, **options) -> list[str]:
    values = {**SMALL, "epochs": EPOCHS[task], "threads": 1, **options}
    args = ["train", "--task", task, "--data", data, "--out", out]
    for key, value in values.items():
        args += [f"--{key.replace('_', '-')}", value]
    if task == "food101":
        args += ["--bert", data_sets["bert"], "--vit", data_sets["vit"]]
    return args


def settings_for(task: str, data_sets: dict, **options) -> TrainSettings:
    extra = {"bert": str(data_sets["bert"]), "vit": str(data_sets["vit"])} if task == "food101" else {}
    values = {**SMALL, "epochs": EPOCHS[task], **extra, **options}
    return TrainSettings.from_dict({"task": task, "data": str(Path(data_sets[task]).resolve()), **values}, "test")


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and "tensorboard" not in p.parts}


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_small_plots():
    """CLI calls with ``--threads 1`` set torch's global thread count: restore it after. The
    run plots are drawn at a low resolution here (PNG encoding dominates these tiny runs)."""
    from multimodal_general.runs import plots as run_plots

    with torch_threads(1), pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_plots, "DPI", 20)
        yield


# ----------------------------------------------------------------------------- data and runs
@pytest.fixture(scope="module")
def data_sets(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("general_data")
    sets = {
        "mosi": write_synthetic_mosi(folder / "mosi.pkl", sizes=(48, 16, 16), steps=8),
        "iemocap": write_synthetic_iemocap(
            folder / "iemocap", folds=1, utterances=80,
            steps={"audio": (4, 12), "vision": (3, 8), "text": (2, 6)},
            dims={"audio": 8, "vision": 8, "text": 16}),
    }
    from multimodal_general.datasets.food101 import write_random_encoders, write_synthetic_food101

    pytest.importorskip("transformers", reason="Food-101 needs the 'food' extra")
    sets["food101"] = write_synthetic_food101(folder / "food101", classes=4, per_class=(8, 3, 3),
                                              image_size=32)
    sets["bert"], sets["vit"] = write_random_encoders(folder / "encoders", hidden=16, image_size=32)
    return sets


@pytest.fixture(scope="module")
def runs(data_sets, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """One finished run per (task, balancer): cggm through the CLI, none through train_run."""
    folder = tmp_path_factory.mktemp("general_runs")
    made = {}
    for task in ("mosi", "iemocap", "food101"):
        out = folder / f"{task}-cggm"
        code, stdout, err = cli(*train_args(task, data_sets[task], out, data_sets, **CGGM))
        assert code == 0, stdout + err
        made[task, "cggm"] = out
        settings = settings_for(task, data_sets)
        out = folder / f"{task}-none"
        train_run(settings, load_task(settings), [0], out)
        made[task, "none"] = out
    return made


CASES = [(task, balancer) for task in ("mosi", "iemocap", "food101") for balancer in ("none", "cggm")]


@pytest.mark.parametrize("task,balancer", CASES)
def test_a_run_folder_holds_every_file(runs, task, balancer):
    run = runs[task, balancer]
    assert (run / "config.yaml").is_file() and (run / "summary.json").is_file() and (run / "summary.md").is_file()
    for name in SEED_FILES:
        assert (run / "seed-0" / name).is_file(), name
    for name in ("balance.png", "validation.png"):
        assert (run / "seed-0" / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["settings"]["balancer"] == balancer and saved["seeds"] == [0]
    assert len(rows(run / "seed-0" / "metrics.jsonl")) == EPOCHS[task]
    with (run / "seed-0" / "metrics.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == EPOCHS[task]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == task and summary["seeds"] == [0]
    assert summary["method"] == ("cggm-stable" if balancer == "cggm" else "none")
    assert "| fused |" in (run / "summary.md").read_text()


@pytest.mark.parametrize("task,balancer", CASES)
def test_test_json_has_the_fields_metrics_for_fused_and_every_head(runs, task, balancer):
    result = json.loads((runs[task, balancer] / "seed-0" / "test.json").read_text())
    assert result["task"] == task and result["seed"] == 0
    for split in ("valid", "test"):
        scores = result[split]
        assert set(scores["heads"]) == set(MODALITIES[task])
        for name, values in [("fused", scores["fused"]), *scores["heads"].items()]:
            assert set(TASK_METRICS[task]) <= set(values), (split, name, values)
            for metric in TASK_METRICS[task]:
                value = values[metric]
                if metric == "corr" and value is None:  # constant predictions: no correlation
                    continue
                assert isinstance(value, float) and math.isfinite(value), (split, name, metric, value)
    summary = json.loads((runs[task, balancer] / "summary.json").read_text())
    for metric in TASK_METRICS[task]:
        mean, std = summary["test"]["fused"][metric]
        if result["test"]["fused"][metric] is not None:
            assert mean == pytest.approx(result["test"]["fused"][metric], abs=1e-12) and std == 0.0


@pytest.mark.parametrize("task", ["mosi", "iemocap", "food101"])
def test_cggm_telemetry_has_finite_b_and_eps_for_every_modality(runs, task):
    with (runs[task, "cggm"] / "seed-0" / "telemetry.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert table
    for m in MODALITIES[task]:
        for key in (f"B/{m}", f"eps/{m}"):
            assert key in table[0], sorted(table[0])
            values = [float(row[key]) for row in table]
            assert all(math.isfinite(v) for v in values), (key, values)
    # the plain run logs no CGGM coefficients
    with (runs[task, "none"] / "seed-0" / "telemetry.csv").open() as handle:
        assert not any(k.startswith("B/") for k in next(csv.DictReader(handle)))


@pytest.mark.parametrize("task,balancer", CASES)
def test_the_selected_epoch_is_the_best_on_validation(runs, task, balancer):
    run = runs[task, balancer] / "seed-0"
    metric, larger = SELECTION[task]
    values = [row[f"val_{metric}"] for row in rows(run / "metrics.jsonl")]
    best = max(values) if larger else min(values)
    expected = values.index(best) + 1  # first best wins
    result = json.loads((run / "test.json").read_text())
    assert result["selected_epoch"] == expected
    assert result["selected_by"] == f"valid {metric} ({'max' if larger else 'min'})"
    # the scored model is that epoch's: its validation metric is the logged one
    assert result["valid"]["fused"][metric] == pytest.approx(best, abs=1e-9)
    payload = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
    assert payload["epoch"] == expected
    assert torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["epoch"] == EPOCHS[task]


def test_selection_never_scores_test_before_training_ends(data_sets, tmp_path, monkeypatch):
    """The test split is scored only after the last epoch, once the model is selected."""
    from multimodal_general.training import runner

    events: list[str] = []
    real_score = runner.score

    def recording_score(parts, data, split):
        events.append(f"score {split}")
        return real_score(parts, data, split)

    monkeypatch.setattr(runner, "score", recording_score)
    settings = settings_for("mosi", data_sets, epochs=2)
    train_run(settings, load_task(settings), [0], tmp_path / "run",
              on_epoch=lambda epoch, row: events.append(f"epoch {epoch}"))
    last_epoch = events.index("epoch 2")
    assert "score test" not in events[:last_epoch], events
    assert events[:last_epoch + 1].count("score valid") == 2
    assert events.count("score test") == 1


def test_mslr_under_adamw_is_applied_once_as_per_encoder_learning_rates(data_sets):
    """AdamW normalizes a gradient factor away: the scales become the encoders' rates, and the
    balancer leaves gradients alone (applied twice, a scale would also shrink Adam's steps
    until its moment estimates caught up)."""
    from multimodal_general.training.runner import build

    settings = settings_for("mosi", data_sets, balancer="mslr", optimizer="adamw",
                            balancer_options={"scales": {"text": 0.5}})
    parts = build(settings, load_task(settings), seed=0)
    assert parts.balancer.applied_by_optimizer
    rates = {g["modality"]: g["lr"] for g in parts.optimizers[0].param_groups if "modality" in g}
    assert rates == {"text": 0.5 * settings.lr, "audio": settings.lr, "vision": settings.lr}
    sgd = settings_for("mosi", data_sets, balancer="mslr", optimizer="sgd", balancer_options={"scales": {"text": 0.5}})
    assert not build(sgd, load_task(sgd), seed=0).balancer.applied_by_optimizer  # SGD: the gradient factor is the rate


# ----------------------------------------------------------------------------- seeds
def test_two_seeds_give_two_folders_and_a_std_over_both(data_sets, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = cli(*train_args("mosi", data_sets["mosi"], out, data_sets, epochs=1, seeds=2))
    assert code == 0, stdout + err
    assert (out / "seed-0" / "test.json").is_file() and (out / "seed-1" / "test.json").is_file()
    assert not (out / "seed-2").exists()
    tests = [json.loads((out / f"seed-{k}" / "test.json").read_text())["test"] for k in (0, 1)]
    assert tests[0]["fused"] != tests[1]["fused"]  # different initialisations
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and yaml.safe_load((out / "config.yaml").read_text())["seeds"] == [0, 1]
    for metric in TASK_METRICS["mosi"]:
        values = [t["fused"][metric] for t in tests]
        if None in values:
            continue
        mean, std = summary["test"]["fused"][metric]
        assert mean == pytest.approx(statistics.fmean(values), abs=1e-12)
        assert std == pytest.approx(statistics.stdev(values), abs=1e-12)
        for m in MODALITIES["mosi"]:
            head = [t["heads"][m][metric] for t in tests]
            if None not in head:
                assert summary["test"]["heads"][m][metric][1] == pytest.approx(statistics.stdev(head), abs=1e-12)


# ----------------------------------------------------------------------------- resume
def test_an_existing_run_folder_is_refused_without_resume(runs, data_sets, tmp_path):
    run = Path(shutil.copytree(runs["mosi", "none"], tmp_path / "run"))
    before = snapshot(run)
    code, _, err = cli(*train_args("mosi", data_sets["mosi"], run, data_sets))
    one_line_error(code, err, "already holds a run", "--resume")
    assert snapshot(run) == before


class Interrupted(Exception):
    pass


def interrupt_after_epoch(epoch, row):
    raise Interrupted(epoch)


def test_resume_continues_an_interrupted_run_from_last_pt(data_sets, tmp_path):
    """A run killed after its first epoch (last.pt written, no test.json) continues with
    ``--resume --epochs 2``: one more epoch row, the first unchanged, the same numbers as an
    uninterrupted two-epoch run (no dropout, so no unsaved randomness)."""
    settings = settings_for("mosi", data_sets, epochs=1, dropout=0.0)
    data = load_task(settings)
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        train_run(settings, data, [0], run, on_epoch=interrupt_after_epoch)
    seed = run / "seed-0"
    assert (seed / "checkpoints" / "last.pt").is_file() and not (seed / "test.json").exists()
    first = rows(seed / "metrics.jsonl")
    assert len(first) == 1
    code, stdout, err = cli(*train_args("mosi", data_sets["mosi"], run, data_sets, epochs=2, dropout=0.0),
                            "--resume")
    assert code == 0, stdout + err
    after = rows(seed / "metrics.jsonl")
    assert len(after) == 2 and after[0] == first[0] and after[1]["epoch"] == 2
    assert after[1]["step"] == 2 * first[0]["step"]
    assert (seed / "test.json").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["settings"]["epochs"] == 2
    telemetry = list(csv.DictReader((seed / "telemetry.csv").open()))
    assert [int(r["step"]) for r in telemetry] == list(range(after[1]["step"]))

    straight = tmp_path / "straight"
    train_run(settings_for("mosi", data_sets, epochs=2, dropout=0.0), data, [0], straight)
    reference = rows(straight / "seed-0" / "metrics.jsonl")
    for resumed, plain in zip(after, reference, strict=True):
        for key, value in plain.items():
            if key != "seconds":
                assert resumed[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("spelling", ["cggm_preset", "preset"])  # --preset: the former name, still accepted
def test_resume_keeps_a_finished_seed(runs, data_sets, tmp_path, spelling):
    """The command that made the run, with --resume appended, continues it."""
    run = Path(shutil.copytree(runs["mosi", "cggm"], tmp_path / "run"))
    seed_files = {k: v for k, v in snapshot(run / "seed-0").items() if not k.startswith("plots/")}
    options = {**{k: v for k, v in CGGM.items() if k != "cggm_preset"}, spelling: CGGM["cggm_preset"]}
    code, stdout, err = cli(*train_args("mosi", data_sets["mosi"], run, data_sets, **options), "--resume")
    assert code == 0, stdout + err
    assert {k: v for k, v in snapshot(run / "seed-0").items() if not k.startswith("plots/")} == seed_files


def test_resume_refuses_options_that_change_the_run(runs, data_sets, tmp_path):
    """Given again with the run's own values, options are fine (the test above); a changed one is
    refused before anything is touched, as ``brats-cggm train --resume`` does."""
    run = Path(shutil.copytree(runs["mosi", "cggm"], tmp_path / "run"))
    before = snapshot(run)
    code, _, err = cli(*train_args("mosi", data_sets["mosi"], run, data_sets, balancer="none", lr=0.5), "--resume")
    one_line_error(code, err, "only --epochs may change", "--balancer 'cggm' -> 'none'", "--lr 0.001 -> 0.5")
    assert snapshot(run) == before


@pytest.mark.parametrize("option, named", [
    (["--cggm-preset", "paper"], "--cggm-preset 'stable' -> 'paper'"),
    (["--preset", "paper"], "--preset 'stable' -> 'paper'"),  # the former name of --cggm-preset
    (["--rho", "2.0"], "--rho 1.2 -> 2.0"),
    (["--balancer-option", "alpha=0.5"], "--balancer-option {} -> {'alpha': 0.5}"),
])
def test_resume_names_the_changed_setting_and_both_values(runs, data_sets, tmp_path, option, named):
    run = Path(shutil.copytree(runs["mosi", "cggm"], tmp_path / "run"))
    flag = {"cggm_preset": "--preset"} if "--preset" in option else {}  # either spelling, not both
    given = {k: v for k, v in CGGM.items() if flag.get(k, f"--{k.replace('_', '-')}") not in option}
    code, _, err = cli(*train_args("mosi", data_sets["mosi"], run, data_sets, **given), *option, "--resume")
    one_line_error(code, err, "only --epochs may change", named)


def test_resume_of_a_folder_without_a_run_is_an_error(data_sets, tmp_path):
    """As brats-cggm train --resume: nothing to continue is a mistake, not a fresh start."""
    code, _, err = cli(*train_args("mosi", data_sets["mosi"], tmp_path / "nothing", data_sets), "--resume")
    one_line_error(code, err, "config.yaml")
    assert not (tmp_path / "nothing").exists()


def test_resume_with_more_epochs_on_a_finished_run_is_consistent(runs, data_sets, tmp_path):
    run = Path(shutil.copytree(runs["mosi", "none"], tmp_path / "run"))
    cli(*train_args("mosi", data_sets["mosi"], run, data_sets, epochs=EPOCHS["mosi"] + 1), "--resume")
    epochs = yaml.safe_load((run / "config.yaml").read_text())["settings"]["epochs"]
    assert epochs == EPOCHS["mosi"] + 1
    assert len(rows(run / "seed-0" / "metrics.jsonl")) == epochs
    assert (run / "seed-0" / "test.json").exists()  # scored again after the extra epoch


# ----------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize("task", ["mosi", "iemocap", "food101"])
def test_evaluate_reproduces_test_json(runs, task):
    run = runs[task, "cggm"]
    expected = json.loads((run / "seed-0" / "test.json").read_text())
    # --split val, as brats-cggm evaluate spells it; valid (the datasets' name) still works
    for given in ("test", "val", "valid") if task == "mosi" else ("test", "val"):
        split = {"val": "valid"}.get(given, given)
        code, stdout, err = cli("evaluate", "--run", run, "--split", given)
        assert code == 0, stdout + err
        result = json.loads((run / f"evaluation-{split}-best.json").read_text())
        assert result["split"] == split and result["checkpoint"] == "best"
        assert result["runs"][0]["epoch"] == expected["selected_epoch"]
        got = result["runs"][0][split]
        for name, values in [("fused", expected[split]["fused"]), *expected[split]["heads"].items()]:
            scored = got["fused"] if name == "fused" else got["heads"][name]
            for metric in TASK_METRICS[task]:
                if values[metric] is None:
                    assert scored[metric] is None
                else:
                    assert scored[metric] == pytest.approx(values[metric], abs=1e-6), (split, name, metric)
        for metric in TASK_METRICS[task]:
            if expected[split]["fused"][metric] is not None:
                assert result["summary"]["fused"][metric][0] == pytest.approx(expected[split]["fused"][metric], abs=1e-6)


def test_evaluate_a_folder_that_is_not_a_run(tmp_path):
    code, _, err = cli("evaluate", "--run", tmp_path)
    one_line_error(code, err, "config.yaml", "not a multimodal-general run folder")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- bad input
def test_missing_data_path(tmp_path):
    out = tmp_path / "run"
    code, _, err = cli("train", "--task", "mosi", "--data", tmp_path / "nope.pkl", "--out", out)
    one_line_error(code, err, "nope.pkl", "does not exist")
    assert not out.exists()


def test_mosi_labels_n_are_refused(data_sets, tmp_path):
    """The [N] vs [N, 1, 1] trap: flat labels are refused before anything is written."""
    with Path(data_sets["mosi"]).open("rb") as handle:
        content = pickle.load(handle)
    for split in content.values():
        split["labels"] = split["labels"].reshape(-1)
    flat = tmp_path / "flat.pkl"
    with flat.open("wb") as handle:
        pickle.dump(content, handle)
    out = tmp_path / "run"
    code, _, err = cli(*train_args("mosi", flat, out, data_sets))
    one_line_error(code, err, "flat.pkl", "labels", "(48,)")
    assert not out.exists()


def test_ogm_ge_on_mosi_is_a_one_line_error(data_sets, tmp_path):
    """Regression: OGM-GE on a regression task is a clear user error (exit 2, one line), not a
    traceback (in-process: any other exception would escape ``cli`` and fail the test)."""
    code, _, err = cli(*train_args("mosi", data_sets["mosi"], tmp_path / "run", data_sets,
                                   balancer="ogm_ge", epochs=1))
    message = one_line_error(code, err, "ogm_ge")
    assert "classification" in message


def test_the_console_script_turns_a_user_error_into_one_line(data_sets, tmp_path):
    out = tmp_path / "run"
    result = script("train", "--task", "mnist", "--data", data_sets["mosi"], "--out", out)
    one_line_error(result.returncode, result.stderr, "unknown task 'mnist'")
    assert not out.exists()


def test_a_failed_start_leaves_no_run_behind(data_sets, tmp_path):
    out = tmp_path / "run"
    code, _, err = cli(*train_args("mosi", data_sets["mosi"], out, data_sets, balancer="ogm_ge", epochs=1))
    one_line_error(code, err, "ogm_ge")
    assert not (out / "config.yaml").exists()


def test_max_steps_on_mosi_keeps_real_steps(data_sets):
    full = load_task(settings_for("mosi", data_sets))
    cut = load_task(settings_for("mosi", data_sets, max_steps=2))
    for m in MODALITIES["mosi"]:
        had = full.splits["train"].masks[m].any(dim=1)
        has = cut.splits["train"].masks[m].any(dim=1)
        assert bool(has[had].all()), f"{m}: {int((had & ~has).sum())} samples lost every real step"


# ----------------------------------------------------------------------------- synth
@pytest.mark.parametrize("task", ["mosi", "iemocap", "food101"])
def test_synth_writes_what_the_reader_reads_and_refuses_an_existing_path(task, tmp_path):
    out = tmp_path / ("data.pkl" if task == "mosi" else "data")
    samples = {"mosi": 12, "iemocap": 20, "food101": 16}[task]
    code, stdout, err = cli("synth", "--task", task, "--out", out, "--samples", samples)
    assert code == 0, stdout + err
    if task == "mosi":
        data = read_mosi(out)
        assert [len(s) for s in data.splits.values()] == [12, 4, 4]
    elif task == "iemocap":
        data = read_iemocap(out, fold=1)
        assert sum(len(s) for s in data.splits.values()) == 20
    else:
        from multimodal_general.datasets.food101 import read_food101

        records = read_food101(out)
        assert [len(s) for s in records.splits.values()] == [16, 8, 8]  # 8 classes x (2, 1, 1)
    before = snapshot(out) if out.is_dir() else out.read_bytes()
    code, _, err = cli("synth", "--task", task, "--out", out, "--samples", samples, "--seed", 1)
    one_line_error(code, err, "exists")
    assert (snapshot(out) if out.is_dir() else out.read_bytes()) == before


# ----------------------------------------------------------------------------- masks and loss
def _batch(lengths: dict[str, list[int]], steps: dict[str, int], dims: dict[str, int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    inputs, masks = {}, {}
    for m, lens in lengths.items():
        x = torch.randn(len(lens), steps[m], dims[m], generator=g)
        mask = torch.arange(steps[m]).unsqueeze(0) < torch.tensor(lens).unsqueeze(1)
        inputs[m], masks[m] = x * mask.unsqueeze(-1), mask
    return SequenceBatch(inputs, masks)


def _net(dims):
    torch.manual_seed(0)
    return SequenceFusionNet(dims, 3, ModelSize(d_model=8, layers=2, heads=2, dropout=0.1)).eval()


def test_padded_steps_do_not_change_the_output():
    dims = {"a": 3, "b": 5}
    net = _net(dims)
    batch = _batch({"a": [5, 3, 1, 2], "b": [2, 4, 4, 1]}, {"a": 5, "b": 4}, dims)
    g = torch.Generator().manual_seed(1)
    longer_inputs, longer_masks = {}, {}
    for m, x in batch.inputs.items():
        garbage = 1e3 * torch.randn(x.shape[0], 6, x.shape[2], generator=g)
        longer_inputs[m] = torch.cat([x, garbage], dim=1)
        longer_masks[m] = torch.cat([batch.masks[m], torch.zeros(x.shape[0], 6, dtype=torch.bool)], dim=1)
        # garbage also inside the padded steps the batch already had
        noise = 1e3 * torch.randn(x.shape, generator=g)
        longer_inputs[m][:, : x.shape[1]] = torch.where(batch.masks[m].unsqueeze(-1), x, noise)
    with torch.no_grad():
        output, features = net(batch)
        padded_output, padded_features = net(SequenceBatch(longer_inputs, longer_masks))
    torch.testing.assert_close(padded_output, output, atol=1e-5, rtol=1e-5)
    for m in dims:
        torch.testing.assert_close(padded_features[m], features[m], atol=1e-5, rtol=1e-5)


def test_a_modality_without_real_steps_gives_finite_output_and_gradients():
    dims = {"a": 3, "b": 5}
    net = _net(dims)
    batch = _batch({"a": [0, 3, 0], "b": [2, 0, 4]}, {"a": 4, "b": 4}, dims)
    assert not batch.masks["a"][0].any() and not batch.masks["b"][1].any()
    with torch.no_grad():
        output, features = net(batch)
    assert torch.isfinite(output).all() and all(torch.isfinite(f).all() for f in features.values())
    net.train()
    output, _ = net(batch)
    output.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    # the caller's mask is not modified by the "attend to step 0" fallback
    assert not batch.masks["a"][0].any()


def test_shape_checked_loss_refuses_n_against_n1():
    loss = task_criterion("regression")
    assert isinstance(loss, ShapeCheckedLoss)
    with pytest.raises(ValueError, match=r"\(4,\).*\(4, 1\)"):
        loss(torch.zeros(4), torch.zeros(4, 1))
    with pytest.raises(ValueError):
        loss(torch.zeros(4, 1), torch.zeros(4))
    with pytest.raises(ValueError):
        loss(torch.zeros(4, 1), torch.zeros(4, 1, 1))
    assert float(loss(torch.zeros(4, 1), torch.ones(4, 1))) == pytest.approx(1.0)


def test_a_diverged_run_is_reported_not_selected(data_sets, tmp_path, monkeypatch):
    """No epoch with a finite validation metric: test.json says diverged (no metrics), the
    summary counts it, and nothing is selected or scored on test."""
    import multimodal_general.training.runner as runner

    monkeypatch.setattr(runner, "_metrics", lambda kind, output, target: {"finite": 0.0})
    data = load_task(settings_for("mosi", data_sets))
    settings = replace(settings_for("mosi", data_sets), epochs=1)
    summary = train_run(settings, data, [0], tmp_path / "run")
    result = json.loads((tmp_path / "run" / "seed-0" / "test.json").read_text())
    assert result["diverged"] is True and result["selected_epoch"] is None
    assert result["test"] == {"fused": {}, "heads": {}}
    assert summary["diverged"] == 1 and not (tmp_path / "run" / "seed-0" / "checkpoints" / "best.pt").exists()
