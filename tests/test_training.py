"""Training end to end on tiny phantoms: configuration, run folder, exact resume (after an
extension, Ctrl-C, SIGKILL), divergence, the early-fusion baseline, the ``train`` and
``evaluate`` commands, and two processes under torchrun.

Every run uses the configuration of :data:`training_cases.TINY` (16^3 patches of 32^3
phantoms, a 4-8-8 network): an epoch takes about a second on 2 CPU cores. The runs that
several tests compare are module fixtures: ``straight`` trains 3 epochs (validated after
epochs 2 and 3) without interruption, and the interrupted runs are resumed and compared
with it bitwise.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from training_cases import (
    CONSOLE_SCRIPT,
    CPU,
    EARLY_FUSION,
    MODALITIES,
    REPO,
    TINY,
    all_finite,
    assert_same_training_state,
    differences,
    in_process,
    load_last,
    nested,
    read_csv,
    read_metrics,
    run_cli,
    start_cli,
    subprocess_env,
    tiny_config,
    torch_threads,
    without_timing,
)

from brats_cggm.data.dataset import make_dataset
from brats_cggm.data.layouts import discover
from brats_cggm.data.phantom import write_phantoms
from brats_cggm.data.transforms import PreprocessConfig, val_transforms
from brats_cggm.errors import ConfigurationError
from brats_cggm.metrics import REGIONS
from brats_cggm.training import (
    TRAINING_PRESETS,
    Interrupted,
    Trainer,
    TrainingDiverged,
    resolve_config,
)
from brats_cggm.training import trainer as trainer_module
from multimodal_general.balance import BalancerSpec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def quiet(line: str) -> None:
    pass


def no_plots(patch: pytest.MonkeyPatch) -> None:
    """Plots cost about a second each; only the tests of the run folder need them."""
    patch.setattr(Trainer, "_plot", lambda self: None)


def write_config(path: Path, data_dir: Path, **dotted) -> Path:
    """The tiny configuration as a YAML file for ``--config``."""
    values = {**TINY, "data.dir": str(data_dir), **dotted}
    path.write_text(yaml.safe_dump(nested(values), sort_keys=False))
    return path


# ------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: these tensors are tiny, and the CPUs are shared (spinning OpenMP
    threads of two processes on 2 cores make a step 10x slower)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """6 phantom cases of 32^3 voxels (7.5 x 7.5 x 4.8 mm): 4 train, 2 validation (~3 s)."""
    out = tmp_path_factory.mktemp("phantoms")
    write_phantoms(out, 6, size=32, layout="brats2021", seed=0)
    return out


@pytest.fixture(scope="module")
def straight(phantoms, tmp_path_factory):
    """3 epochs of CGGM training without interruption, with plots."""
    run = tmp_path_factory.mktemp("straight") / "run"
    config = tiny_config(phantoms)
    lines: list[str] = []
    summary = Trainer(config, run, CPU, report=lines.append).fit()
    return SimpleNamespace(run=run, config=config, summary=summary, lines=lines)


# ---------------------------------------------------------------- 1. configuration
def test_preset_then_file_then_overrides(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump({
        "optim": {"lr": 0.05, "epochs": 7},
        "preprocess": {"num_samples": 3},
        "network": {"overrides": {"channels": [8, 16, 32, 64], "head_channels": 4}},
    }))
    config = resolve_config("cpu-small", file, {"optim.epochs": 9, "optim.lr": None,
                                                "network.overrides": {"head_channels": 2}})
    preset = TRAINING_PRESETS["cpu-small"]
    assert preset["optim"]["lr"] != 0.05 and preset["optim"]["epochs"] not in (7, 9)
    assert config.optim.lr == 0.05  # the file over the preset; a None override is skipped
    assert config.optim.epochs == 9  # the override over the file
    assert config.optim.optimizer == preset["optim"]["optimizer"]  # the preset's, untouched
    assert config.optim.momentum == 0.99  # the dataclass default, untouched
    assert config.validation.every == preset["validation"]["every"]
    assert config.preprocessing.num_samples == 3 and config.preprocessing.patch_size == (48, 48, 48)
    assert config.network.overrides == {"head_channels": 2}  # overrides are replaced whole, not merged
    gpu = resolve_config("gpu", file)
    assert gpu.preprocessing.spacing == (1.0, 1.0, 1.0) and gpu.data.num_workers == 4
    assert gpu.optim.lr == 0.05 and gpu.optim.epochs == 7


@pytest.mark.parametrize("overrides, named", [
    ({"optim.lrr": 0.1}, "lrr"),
    ({"bogus.x": 1}, "bogus"),
    ({"preprocess.patch": [16, 16, 16]}, "patch"),
])
def test_unknown_settings_are_named(overrides, named):
    with pytest.raises(ConfigurationError, match=re.escape(named)):
        resolve_config("cpu-small", overrides=overrides)


def test_unknown_setting_in_a_file_names_the_file(tmp_path):
    file = tmp_path / "bad.yaml"
    file.write_text("optim:\n  lr: 0.1\n  warmup: 5\n")
    with pytest.raises(ConfigurationError) as info:
        resolve_config("cpu-small", file)
    assert str(file) in str(info.value) and "warmup" in str(info.value)


@pytest.mark.parametrize("key, value", [
    ("optim.epochs", "3"),
    ("optim.epochs", 2.5),
    ("optim.epochs", True),
    ("optim.lr", "fast"),
    ("validation.hd95", "yes"),
    ("data.val_fraction", [0.2]),
    ("preprocess.patch_size", 2.5),
    ("preprocess.num_samples", "2"),
])
def test_wrong_types_are_configuration_errors_naming_the_setting(key, value):
    """A wrong type must be a one-line ConfigurationError naming the setting, never a
    TypeError from deep inside (the CLI turns only user errors into one line)."""
    with pytest.raises(ConfigurationError) as info:
        resolve_config("cpu-small", overrides={key: value})
    assert key.split(".")[-1] in str(info.value), str(info.value)


@pytest.mark.parametrize("key, value", [
    ("optim.optimizer", "adam"),
    ("optim.schedule", "step"),
    ("optim.amp", "yes"),
    ("data.cache", "ram"),
    ("device", "tpu"),
    ("optim.lr", 0.0),
    ("optim.epochs", 0),
    ("validation.overlap", 1.0),
    ("data.val_fraction", 1.0),
])
def test_bad_values_are_rejected_with_their_dotted_name(key, value):
    with pytest.raises(ConfigurationError, match=re.escape(key)):
        resolve_config("cpu-small", overrides={key: value})


@pytest.mark.parametrize("key, value, named", [
    ("balancer.name", "cgm", "balancer: unknown balancer 'cgm'"),
    ("balancer.preset", "nonsense", "balancer: unknown CGGM preset 'nonsense'"),
    ("balancer.rho", -1, "balancer: CGGM needs rho > 0"),
    ("network.preset", "tiny", "network.preset"),
])
def test_component_names_are_checked_with_the_configuration(key, value, named):
    """A misspelt balancer or network is a mistake of the configuration, reported when it
    is resolved (as ``optim.optimizer`` is), not after the data set has been cached."""
    with pytest.raises(ConfigurationError, match=re.escape(named)):
        resolve_config("cpu-small", overrides={key: value})


def test_the_balancer_section_keeps_its_defaults():
    """rho 1.0 and soft Dice unless set (not the spec's 1.2), whatever else the section sets."""
    assert resolve_config("cpu-small").balancer == BalancerSpec("cggm", "stable", 1.0, 0.1, "soft_dice")
    balancer = resolve_config("cpu-small", overrides={"balancer.name": "agm", "balancer.options.alpha": 0.5}).balancer
    assert (balancer.rho, balancer.metric, balancer.options) == (1.0, "soft_dice", {"alpha": 0.5})
    assert resolve_config("cpu-real").balancer.rho == 1.0


def test_saved_configuration_round_trips(straight):
    saved = straight.run / "config.yaml"
    assert resolve_config("cpu-small", saved).to_dict() == straight.config.to_dict()
    # the file holds every setting: whatever preset it is read over, it gives the same run
    assert resolve_config("gpu", saved).to_dict() == straight.config.to_dict()
    assert load_last(straight.run)["config"] == straight.config.to_dict()


# ----------------------------------------------------------------- 2. run folder
def test_a_run_writes_its_folder(straight):
    run = straight.run
    for name in ("config.yaml", "split.json", "checkpoints/last.pt", "checkpoints/best.pt",
                 "metrics.jsonl", "metrics.csv", "telemetry.csv", "summary.json"):
        assert (run / name).is_file(), name

    fold = json.loads((run / "split.json").read_text())["folds"][0]
    assert len(fold["train"]) == 4 and len(fold["val"]) == 2 and not set(fold["train"]) & set(fold["val"])

    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and [r["step"] for r in rows] == [4, 8, 12]
    assert [r["epoch"] for r in rows if "val_dice/mean" in r] == [2, 3]  # validation.every 2, and the last
    for row in rows:
        for m in MODALITIES:
            for key in (f"head_dice/{m}", f"B/{m}"):
                assert math.isfinite(row[key]), (row["epoch"], key)
        if "val_dice/mean" in row:
            dice = [row[f"val_dice/{r}"] for r in REGIONS]
            assert all(0 <= d <= 1 for d in dice) and row["val_dice/mean"] == pytest.approx(sum(dice) / 3)
            assert all(f"val_head_dice/{m}" in row for m in MODALITIES)
            for m in MODALITIES:  # per region too; their mean is the head's mean Dice
                per_region = [row[f"val_head_region_dice/{m}/{r}"] for r in REGIONS]
                assert row[f"val_head_dice/{m}"] == pytest.approx(sum(per_region) / 3, abs=1e-4)
        else:
            assert not any(k.startswith("val_") for k in row)
    assert all(math.isfinite(r["train_loss"]) for r in rows)

    table = read_csv(run / "metrics.csv")
    assert [float(r["train_loss"]) for r in table] == [r["train_loss"] for r in rows]
    assert table[0]["val_dice/mean"] == "" and float(table[2]["val_dice/mean"]) == rows[2]["val_dice/mean"]

    telemetry = read_csv(run / "telemetry.csv")
    assert [int(r["step"]) for r in telemetry] == list(range(1, 13))
    assert [int(r["epoch"]) for r in telemetry] == [1] * 4 + [2] * 4 + [3] * 4
    for m in MODALITIES:
        b = [float(r[f"B/{m}"]) for r in telemetry]
        assert all(math.isfinite(x) for x in b), b
    assert any(float(r["B/flair"]) != 1.0 for r in telemetry)  # CGGM did modulate

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    assert [e.step for e in board.Scalars("train_loss")] == [1, 2, 3]
    assert [e.step for e in board.Scalars("val_dice/mean")] == [2, 3]
    assert board.Scalars("train_loss")[0].value == pytest.approx(rows[0]["train_loss"])

    plots = {p.name for p in (run / "plots").glob("*.png")}
    assert plots == {"loss.png", "dice.png", "balance.png"}
    for name in plots:
        assert (run / "plots" / name).read_bytes()[:8] == PNG_SIGNATURE

    for epoch, validated in ((1, False), (2, True), (3, True)):
        path = run / "validation" / f"epoch{epoch:04d}.json"
        assert path.exists() == validated
        if validated:
            assert sorted(r["case_id"] for r in json.loads(path.read_text())) == sorted(fold["val"])

    summary = json.loads((run / "summary.json").read_text())
    best = max((r for r in rows if "val_dice/mean" in r), key=lambda r: r["val_dice/mean"])
    assert summary["best_val_dice_mean"] == best["val_dice/mean"]
    assert summary["best_epoch"] == best["epoch"]
    assert (summary["epochs"], summary["steps"], summary["train_cases"], summary["val_cases"],
            summary["world_size"]) == (3, 12, 4, 2, 1)
    assert summary["final"]["epoch"] == 3

    best_pt = torch.load(run / "checkpoints" / "best.pt", weights_only=False)
    assert best_pt["kind"] == "model" and best_pt["epoch"] == best["epoch"]
    assert best_pt["metrics"]["val_dice/mean"] == best["val_dice/mean"]
    assert sorted(best_pt["val_cases"]) == sorted(fold["val"])
    last = load_last(run)
    assert last["progress"]["epoch"] == 3 and last["progress"]["batch"] == 0 and last["progress"]["step"] == 12
    assert last["progress"]["best_dice"] == best["val_dice/mean"]
    if best["epoch"] == 3:
        assert not differences(best_pt["network"], last["modules"]["net"])
    assert set(last["modules"]) == {"net", "balancer"}
    assert not all_finite(last["modules"]["net"]) and not all_finite(last["modules"]["balancer"])

    assert [line.split()[1] for line in straight.lines] == ["1/3", "2/3", "3/3"]
    assert "val Dice" in straight.lines[1] and "val Dice" not in straight.lines[0]


def test_a_second_run_in_place_is_refused_without_touching_the_first(straight, phantoms):
    before = {p: p.read_bytes() for p in (straight.run / "metrics.jsonl", straight.run / "telemetry.csv")}
    with pytest.raises(ConfigurationError, match="already holds a run"):
        Trainer(straight.config, straight.run, CPU, report=quiet)
    assert {p: p.read_bytes() for p in before} == before


# ------------------------------------------------------------ 3. exact resume
def test_extending_a_finished_run_equals_training_longer(phantoms, tmp_path, monkeypatch):
    """1 epoch, then resumed with epochs=2: the same bits as 2 epochs straight. (With a
    constant learning rate: poly and cosine are stretched over the new length on resume.)"""
    no_plots(monkeypatch)
    longer = tiny_config(phantoms, optim__schedule="none", optim__epochs=2, validation__every=1)
    shorter = tiny_config(phantoms, optim__schedule="none", optim__epochs=1, validation__every=1)
    a, b = tmp_path / "a", tmp_path / "b"
    Trainer(longer, a, CPU, report=quiet).fit()
    Trainer(shorter, b, CPU, report=quiet).fit()
    assert load_last(b)["progress"]["epoch"] == 1
    Trainer(longer, b, CPU, resume=True, report=quiet).fit()
    assert_same_training_state(a, b)
    assert read_csv(a / "telemetry.csv") == read_csv(b / "telemetry.csv")
    assert without_timing(read_metrics(a)) == without_timing(read_metrics(b))


def test_extending_a_run_puts_every_later_step_on_the_new_schedule(phantoms, tmp_path, monkeypatch):
    """Poly over 4 steps, then resumed with 2 epochs: steps 5-8 follow poly over 8 steps.
    The first step after the resume must not keep the rate of the old schedule's end."""
    no_plots(monkeypatch)
    run = tmp_path / "run"
    config = tiny_config(phantoms, optim__epochs=1)
    assert config.optim.schedule == "poly"
    Trainer(config, run, CPU, report=quiet).fit()
    Trainer(tiny_config(phantoms, optim__epochs=2), run, CPU, resume=True, report=quiet).fit()
    rates = [float(r["lr"]) for r in read_csv(run / "telemetry.csv")]
    lr = config.optim.lr
    before = [lr * (1 - min(t, 3) / 4) ** 0.9 for t in range(4)]
    after = [lr * (1 - min(t, 7) / 8) ** 0.9 for t in range(4, 8)]
    assert rates[:4] == pytest.approx(before, rel=1e-9)
    assert rates[4:] == pytest.approx(after, rel=1e-9), f"steps 5-8 ran at {rates[4:]}, the new schedule says {after}"


def test_a_checkpoint_of_the_earlier_network_loads_as_it_trained_and_does_not_resume(straight, tmp_path):
    """Checkpoints record the network revision; one without it (written before the fused
    decoder's last layer became linear) is rebuilt with that layer normalised, as it trained,
    and is not resumed into the new network."""
    import shutil

    from brats_cggm.errors import IncompatibleModel
    from brats_cggm.training.checkpoint import NETWORK_REVISION
    from brats_cggm.training.trained import load_run

    assert load_last(straight.run)["network_revision"] == NETWORK_REVISION == 2
    assert not hasattr(load_run(straight.run).net.decoder.to_input, "adn")  # linear: no norm, no activation
    old = tmp_path / "old"
    shutil.copytree(straight.run, old)
    for name in ("best.pt", "last.pt"):
        payload = torch.load(old / "checkpoints" / name, map_location="cpu", weights_only=False)
        del payload["network_revision"]
        torch.save(payload, old / "checkpoints" / name)
    assert hasattr(load_run(old).net.decoder.to_input, "adn")
    with pytest.raises(IncompatibleModel, match="earlier multi-branch network"):
        Trainer(straight.config, old, CPU, resume=True, report=quiet)


# -------------------------------------------------------------- 4. Ctrl-C
DONE_BEFORE_CTRL_C = 6  # epoch 2, after its second batch


@pytest.fixture(scope="module")
def ctrl_c_between_steps(straight, tmp_path_factory):
    """The straight run's configuration, Ctrl-C before the 7th step, then resumed."""
    run = tmp_path_factory.mktemp("ctrl_c") / "run"
    with pytest.MonkeyPatch.context() as patch:
        no_plots(patch)
        step, calls = Trainer._step, []

        def step_until_ctrl_c(self, batch):
            if len(calls) == DONE_BEFORE_CTRL_C:
                raise KeyboardInterrupt
            calls.append(None)
            return step(self, batch)

        patch.setattr(Trainer, "_step", step_until_ctrl_c)
        trainer = Trainer(straight.config, run, CPU, report=quiet)
        try:
            trainer.fit()
            error = None
        except Interrupted as interrupted:
            error = interrupted
        saved = load_last(run)
        patch.setattr(Trainer, "_step", step)
        Trainer(straight.config, run, CPU, resume=True, report=quiet).fit()
    return SimpleNamespace(run=run, error=error, saved=saved)


def test_ctrl_c_saves_the_progress_within_the_epoch(ctrl_c_between_steps):
    c = ctrl_c_between_steps
    assert isinstance(c.error, Interrupted), "fit() did not raise Interrupted"
    assert "epoch 2" in str(c.error) and "--resume" in str(c.error) and str(c.run) in str(c.error)
    progress = c.saved["progress"]
    assert (progress["epoch"], progress["batch"], progress["step"]) == (1, 2, DONE_BEFORE_CTRL_C)
    assert c.saved["scheduler"]["last_epoch"] == DONE_BEFORE_CTRL_C


def test_resume_after_ctrl_c_within_an_epoch_is_exact(straight, ctrl_c_between_steps):
    """Trainer._batches replays the 2 batches done and skips them: the same bits."""
    assert_same_training_state(straight.run, ctrl_c_between_steps.run)
    assert read_csv(straight.run / "telemetry.csv") == read_csv(ctrl_c_between_steps.run / "telemetry.csv")


def test_resume_after_ctrl_c_within_an_epoch_logs_the_whole_epoch(straight, ctrl_c_between_steps):
    """The row of the interrupted epoch averages all its 4 steps, not the 2 after the resume."""
    got, expected = read_metrics(ctrl_c_between_steps.run), read_metrics(straight.run)
    assert [r["epoch"] for r in got] == [1, 2, 3]
    wrong = {k: (got[1][k], v) for k, v in without_timing(expected)[1].items() if got[1].get(k) != v}
    assert not wrong, f"epoch 2 (resumed after 2 of 4 steps) logged, as (resumed, straight): {wrong}"


def test_ctrl_c_inside_a_step_leaves_a_consistent_checkpoint(straight, tmp_path, monkeypatch):
    """A real SIGINT arriving just after the 6th optimizer update (while _step finishes):
    the checkpoint must not hold 6 updates with progress saying 5, which a resume would
    turn into the 6th batch applied twice."""
    no_plots(monkeypatch)
    run = tmp_path / "run"
    trainer = Trainer(straight.config, run, CPU, report=quiet)
    with pytest.MonkeyPatch.context() as patch:
        scheduler_step, calls = torch.optim.lr_scheduler.LambdaLR.step, []

        def step_then_sigint(self, *args, **kwargs):
            scheduler_step(self, *args, **kwargs)
            calls.append(None)
            if len(calls) == DONE_BEFORE_CTRL_C:
                signal.raise_signal(signal.SIGINT)

        patch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", step_then_sigint)
        with pytest.raises(Interrupted):
            trainer.fit()
    saved = load_last(run)
    steps = (saved["progress"]["step"], saved["scheduler"]["last_epoch"], int(saved["modules"]["balancer"]["step_count"]))
    assert steps[0] == steps[1] == steps[2], (
        "checkpoint after Ctrl-C: (progress step, scheduler steps, balancer steps) = " + str(steps)
    )
    Trainer(straight.config, run, CPU, resume=True, report=quiet).fit()
    assert_same_training_state(straight.run, run)


def test_ctrl_c_during_validation_keeps_the_epoch(straight, tmp_path, monkeypatch):
    """Ctrl-C while epoch 2 is being validated (whole cases: the slow part of an epoch on
    real data): after the resume, epoch 2 has its metrics row and its validation."""
    no_plots(monkeypatch)
    run = tmp_path / "run"
    validate = trainer_module.validate_cases

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "validate_cases", interrupted)
    with pytest.raises(Interrupted):
        Trainer(straight.config, run, CPU, report=quiet).fit()
    monkeypatch.setattr(trainer_module, "validate_cases", validate)
    Trainer(straight.config, run, CPU, resume=True, report=quiet).fit()
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3], "an epoch's metrics row is missing"
    assert (run / "validation" / "epoch0002.json").exists(), "epoch 2 was never validated"
    assert without_timing(read_metrics(run)) == without_timing(read_metrics(straight.run))
    assert_same_training_state(straight.run, run)  # weights, and the best epoch with them


# ------------------------------------------------------------------ 6. NaN
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(phantoms, tmp_path, monkeypatch):
    no_plots(monkeypatch)
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(phantoms, optim__epochs=2), run, CPU, report=quiet)
    criterion = trainer.parts.criterion
    forward = criterion.forward

    def nan_in_epoch_2(logits, target):
        loss = forward(logits, target)
        return loss * float("nan") if (trainer.state.epoch, trainer.state.batch) >= (1, 1) else loss

    monkeypatch.setattr(criterion, "forward", nan_in_epoch_2)
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit()
    message = str(info.value)
    last = run / "checkpoints" / "last.pt"
    assert "epoch 2, step 6" in message and f"{last} (epoch 1)" in message, message
    saved = load_last(run)
    assert saved["progress"]["epoch"] == 1 and saved["progress"]["step"] == 4
    for name, state in saved["modules"].items():
        assert not all_finite(state), f"{name}: {all_finite(state)}"
    optimizer_state = {f"{i}/{k}": v for i, state in saved["optimizer"]["state"].items() for k, v in state.items()}
    assert optimizer_state and not all_finite(optimizer_state), all_finite(optimizer_state)
    assert len(read_metrics(run)) == 1


# ---------------------------------------------------------- 7. early fusion
def test_early_fusion_trains_without_a_balancer(phantoms, tmp_path):
    run = tmp_path / "run"
    config = tiny_config(phantoms, network__preset="early_fusion", network__overrides=EARLY_FUSION,
                         balancer__name="none", optim__epochs=1)
    summary = Trainer(config, run, CPU, report=quiet).fit()
    saved = load_last(run)
    assert set(saved["modules"]) == {"net"} and not all_finite(saved["modules"]["net"])
    assert math.isfinite(summary["best_val_dice_mean"]) and summary["best_epoch"] == 1
    (row,) = read_metrics(run)
    assert "val_dice/mean" in row and not any(k.startswith(("B/", "head_dice/")) for k in row)
    assert list(read_csv(run / "telemetry.csv")[0]) == ["step", "epoch", "loss", "lr"]
    assert {p.name for p in (run / "plots").glob("*.png")} >= {"loss.png", "dice.png"}


def test_cggm_can_apply_b_as_each_encoders_learning_rate(phantoms, tmp_path):
    """balancer.options.scale_by learning_rate: each branch encoder is a param group of its own
    whose rate is B times the network's (the schedule's factor included), set at every step."""
    run = tmp_path / "run"
    config = tiny_config(phantoms, balancer__name="cggm", balancer__preset="deficit",
                         balancer__options={"scale_by": "learning_rate"}, optim__epochs=1)
    Trainer(config, run, CPU, report=quiet).fit()
    groups = load_last(run)["optimizer"]["param_groups"]
    rates = {g["modality"]: g["lr"] for g in groups if "modality" in g}
    assert sorted(rates) == sorted(MODALITIES)
    last = read_csv(run / "telemetry.csv")[-1]
    network_rate = groups[len(MODALITIES)]["lr"]  # the rest of the network, after the encoders
    for name, rate in rates.items():
        assert rate == pytest.approx(float(last[f"B/{name}"]) * network_rate, rel=1e-4), name
    assert len(set(rates.values())) > 1


def test_joint_training_without_heads_trains_the_same_network(phantoms, tmp_path):
    """Under balancer none the heads train on detached features and only report: without them
    (network.heads false) the four-branch network's weights come out the same, with sequence
    dropout on; the run has no head telemetry. Other balancers refuse it."""
    weights = {}
    for heads in (True, False):
        run = tmp_path / f"heads-{heads}"
        config = tiny_config(phantoms, balancer__name="none", network__heads=heads, network__fusion="slots",
                             network__sequence_dropout=0.5, optim__epochs=1)
        Trainer(config, run, CPU, report=quiet).fit()
        saved = load_last(run)
        weights[heads] = saved["modules"]["net"]
        assert ("balancer" in saved["modules"]) == heads
        assert any(k.startswith("head_dice/") for k in read_metrics(run)[0]) == heads
    assert weights[True].keys() == weights[False].keys()
    assert all(torch.allclose(weights[True][k], weights[False][k], atol=1e-6) for k in weights[True])
    with pytest.raises(ConfigurationError, match="network.heads false works with balancer none only"):
        tiny_config(phantoms, balancer__name="cggm", network__heads=False)


@pytest.mark.parametrize("network, fusion", [("early_fusion", None), ("small", "hemis")])
def test_the_cpu_real_preset_builds_either_network(network, fusion):
    """cpu-real's HeMIS fusion goes to the four-branch network; early fusion has no branches."""
    from brats_cggm.training.components import network_from_config

    net = network_from_config(resolve_config("cpu-real", None, {"network.preset": network}).network)
    assert getattr(net, "fusion_name", None) == fusion


def test_early_fusion_with_cggm_is_refused_naming_the_network(phantoms, tmp_path):
    run = tmp_path / "run"
    config = tiny_config(phantoms, network__preset="early_fusion", network__overrides=EARLY_FUSION,
                         balancer__name="cggm")
    with pytest.raises(ConfigurationError) as info:
        Trainer(config, run, CPU, report=quiet)
    assert "'early_fusion'" in str(info.value) and "none" in str(info.value)
    assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()


# -------------------------------------------------------- 8, 9. the commands
#: CGGM's settings as options (the configuration's own values), spelled as in multimodal-general train
CGGM_OPTIONS = ("--cggm-preset", "stable", "--rho", "1.0", "--lam", "0.1")


@pytest.fixture(scope="module")
def cli_run(phantoms, tmp_path_factory):
    """``brats-cggm train --config tiny.yaml --epochs 1 --cggm-preset ...`` in a subprocess."""
    folder = tmp_path_factory.mktemp("cli")
    config = write_config(folder / "tiny.yaml", phantoms)
    run = folder / "run"
    result = run_cli("train", "--config", config, "--out", run, "--epochs", "1", *CGGM_OPTIONS)
    return SimpleNamespace(run=run, config=config, result=result)


@pytest.mark.parametrize("command, words", [("train", ("--resume", "--config", "--set")),
                                            ("evaluate", ("--run", "--split", "--checkpoint"))])
def test_help_of_train_and_evaluate(command, words):
    result = subprocess.run([str(CONSOLE_SCRIPT), command, "--help"], check=False, capture_output=True, text=True,
                            timeout=60, env=subprocess_env())
    assert result.returncode == 0, result.stderr
    assert all(word in result.stdout for word in words), result.stdout


def test_train_command_writes_a_run(cli_run):
    assert cli_run.result.returncode == 0, cli_run.result.stdout + cli_run.result.stderr
    assert "done" in cli_run.result.stdout and "best mean validation Dice" in cli_run.result.stdout
    assert (cli_run.run / "checkpoints" / "best.pt").exists()
    assert yaml.safe_load((cli_run.run / "config.yaml").read_text())["optim"]["epochs"] == 1


def test_second_train_into_a_run_folder_is_an_error(cli_run, capsys):
    before = {name: (cli_run.run / name).read_bytes() for name in ("metrics.jsonl", "telemetry.csv", "config.yaml")}
    code, out, err = in_process(capsys, "train", "--config", cli_run.config, "--out", cli_run.run)
    assert code == 2 and len(err.strip().splitlines()) == 1, f"exit status {code}: {out}{err}"
    assert err.startswith("error: ") and "already holds a run" in err and "--resume" in err, err
    assert {name: (cli_run.run / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("option, named", [
    (["--lr", "0.5"], "optim.lr"),
    (["--set", "optim.momentum=0.9"], "optim.momentum"),
    (["--balancer", "none"], "balancer.name"),
    (["--data", "elsewhere"], "data.dir"),
    (["--config", "tiny.yaml", "--set", "validation.every=3"], "validation.every 2 -> 3"),
    (["--preset", "gpu"], "network.preset"),
    (["--cggm-preset", "paper"], "balancer.preset 'stable' -> 'paper'"),
    (["--rho", "2.5"], "balancer.rho 1.0 -> 2.5"),
    (["--balancer-option", "alpha=0.5"], "balancer.options.alpha None -> 0.5"),
])
def test_resume_refuses_changed_options(cli_run, capsys, option, named):
    option = [str(cli_run.config) if o == "tiny.yaml" else o for o in option]
    before = load_last(cli_run.run)["progress"]
    code, out, err = in_process(capsys, "train", "--out", cli_run.run, "--resume", *option)
    assert code == 2, f"exit status {code}: {out}{err}"
    assert err.strip().startswith("error: ") and named in err and "--epochs" in err, err
    assert load_last(cli_run.run)["progress"] == before


def test_resume_accepts_the_command_that_started_the_run(cli_run, capsys):
    """The exact command plus --resume continues the run (as nnU-Net's --c does)."""
    code, out, err = in_process(capsys, "train", "--config", cli_run.config, "--out", cli_run.run, "--epochs", "1",
                                *CGGM_OPTIONS, "--resume")
    assert code == 0, f"exit status {code}: {out}{err}"
    assert load_last(cli_run.run)["progress"]["epoch"] == 1


@pytest.mark.parametrize("setting, named", [("balancer.preset=nonsense", "unknown CGGM preset 'nonsense'"),
                                             ("balancer.rho=-1", "CGGM needs rho > 0")])
def test_a_bad_balancer_setting_fails_before_any_data_is_read(tmp_path, capsys, setting, named):
    data = tmp_path / "data"
    data.mkdir()  # no cases: reading it would fail otherwise
    code, out, err = in_process(capsys, "train", "--data", data, "--out", tmp_path / "run", "--set", setting)
    assert code == 2 and len(err.strip().splitlines()) == 1, f"exit status {code}: {out}{err}"
    assert err.startswith("error: ") and named in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"] and not any(data.iterdir())


def test_resume_of_a_folder_without_a_run_is_an_error(tmp_path, capsys):
    code, _, err = in_process(capsys, "train", "--out", tmp_path / "nothing", "--resume")
    assert code == 2 and err.startswith("error: ") and "config.yaml" in err, err


def test_evaluate_command_scores_the_validation_cases(cli_run, capsys):
    assert cli_run.result.returncode == 0, cli_run.result.stderr
    code, out, err = in_process(capsys, "evaluate", "--run", cli_run.run)
    assert code == 0, out + err
    for word in ("TC", "WT", "ET", "Dice", "HD95", "2 val case(s)"):
        assert word in out, out
    val = sorted(json.loads((cli_run.run / "split.json").read_text())["folds"][0]["val"])
    folder = cli_run.run / "evaluation" / "val"
    rows = read_csv(folder / "cases.csv")
    assert sorted(r["case_id"] for r in rows) == val
    for row in rows:
        for region in REGIONS:
            assert 0 <= float(row[f"dice/{region}"]) <= 1 and float(row[f"hd95/{region}"]) >= 0
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["cases"] == 2 and summary["split"] == "val"
    assert summary["metrics"]["dice/WT"]["n"] == 2
    mean = sum(float(r["dice/WT"]) for r in rows) / 2
    assert summary["metrics"]["dice/WT"]["mean"] == pytest.approx(mean)


def test_evaluate_train_split_is_a_fit_check_on_the_training_cases(cli_run):
    from brats_cggm.evaluation import evaluate

    rows, summary, folder = evaluate(cli_run.run, split="train", checkpoint="last")
    train = sorted(json.loads((cli_run.run / "split.json").read_text())["folds"][0]["train"])
    assert sorted(r["case_id"] for r in rows) == train and summary["split"] == "train"
    assert folder == cli_run.run / "evaluation" / "train"


def test_evaluate_test_split_without_held_out_cases_is_an_error(cli_run, capsys):
    assert cli_run.result.returncode == 0, cli_run.result.stderr
    code, _, err = in_process(capsys, "evaluate", "--run", cli_run.run, "--split", "test")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no test cases" in err, err
    assert not (cli_run.run / "evaluation" / "test").exists()


def test_evaluate_test_split_is_the_test_cases_a_split_names_else_every_unnamed_case(phantoms, tmp_path):
    """A nested split (the candidate screen's inner folds) names its test cases: the folder's
    other cases (the outer test fold) are not scored; a split without test cases scores every
    case it does not name."""
    from brats_cggm.evaluation import choose_cases

    ids = sorted(c.case_id for c in discover(phantoms).cases)
    config = tiny_config(phantoms)
    for fold, expected in (({"train": ids[:2], "val": ids[2:3], "test": ids[3:4]}, ids[3:4]),
                           ({"train": ids[:2], "val": ids[2:3]}, ids[3:])):
        (tmp_path / "split.json").write_text(json.dumps({"seed": 0, "folds": [fold]}))
        assert [c.case_id for c in choose_cases(tmp_path, config, None, "test")] == expected


# --------------------------------------------------------------- 5. SIGKILL
@pytest.mark.slow  # 40-70 s; the in-process resume tests above cover the same checkpoints cheaply
def test_sigkill_then_resume_equals_an_uninterrupted_run(phantoms, tmp_path):
    """Two `brats-cggm train` processes of one configuration (one thread each); one is
    killed with SIGKILL after its first checkpoint and resumed with --resume."""
    config = write_config(tmp_path / "tiny.yaml", phantoms, **{"optim.epochs": 4})
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    straight = start_cli("train", "--config", config, "--out", whole, log=tmp_path / "whole.log")
    victim = start_cli("train", "--config", config, "--out", killed, log=tmp_path / "killed.log")
    try:
        last, deadline = killed / "checkpoints" / "last.pt", time.monotonic() + 120
        while True:
            assert victim.poll() is None, "the run ended before it could be killed:\n" + (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            if last.exists() and load_last(killed)["progress"]["epoch"] >= 1:
                break
            time.sleep(0.05)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(30)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    epoch_at_kill = load_last(killed)["progress"]["epoch"]
    assert 1 <= epoch_at_kill < 4
    resumed = run_cli("train", "--out", killed, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert straight.wait(180) == 0, (tmp_path / "whole.log").read_text()
    assert load_last(killed)["progress"]["epoch"] == 4
    assert_same_training_state(whole, killed)
    assert read_csv(whole / "telemetry.csv") == read_csv(killed / "telemetry.csv")
    assert without_timing(read_metrics(whole)) == without_timing(read_metrics(killed))


# -------------------------------------------------- the data cache of a run
def test_training_data_cache_filled_by_threads_keeps_every_case_whole(phantoms, monkeypatch):
    """The memory cache of Trainer's data sets is filled by a thread per CPU, all through
    one LoadImaged. MONAI's NibabelReader keeps the file names of its last read() on the
    shared instance, so a thread that reads a case's four images while another reads a
    label gets a 1-channel image. Here the first image read is held back 0.5 s so that the
    other thread reads in between (without the delay: about 2 runs in 3 on 2 cores)."""
    from monai.data.image_reader import NibabelReader

    get_data, lock, calls = NibabelReader.get_data, threading.Lock(), []

    def first_call_late(self, img):
        with lock:
            calls.append(None)
            first = len(calls) == 1
        if first:
            time.sleep(0.5)
        return get_data(self, img)

    monkeypatch.setattr(NibabelReader, "get_data", first_call_late)
    cases = discover(phantoms, None).cases[:2]
    pre = PreprocessConfig(spacing=(7.5, 7.5, 7.5), patch_size=(16, 16, 16), num_samples=1)
    dataset = make_dataset(cases, val_transforms(pre), cache="memory", num_workers=2)
    assert [dataset[i]["image"].shape[0] for i in range(2)] == [4, 4]


# ----------------------------------------------------------------- 10. DDP
@pytest.mark.distributed
@pytest.mark.parametrize("balancer", [
    {"balancer.name": "cggm"},
    # weights from the ranks' mean train losses (each rank's own would differ) after epoch 2
    {"balancer.name": "gblending", "balancer.options": {"super_epoch": 1}, "validation.every": 1},
], ids=["cggm", "gblending"])
def test_two_processes_train_one_run_with_identical_ranks(phantoms, tmp_path, balancer):
    """``torchrun --nproc_per_node=2`` of the train command (gloo, CPU): each rank trains on
    2 of the 4 training cases and validates 1 of the 2 validation cases. The worker dumps
    each rank's final state: they must be bitwise equal (DDP averages the network's
    gradients, the balancer all-reduces its statistics and averages the heads' gradients)."""
    config = write_config(tmp_path / "tiny.yaml", phantoms, **{"optim.epochs": 2, **balancer})
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(Path(__file__).with_name("training_cases.py")), "train", "--config", str(config),
               "--out", str(run)]
    try:
        done = subprocess.run(command, check=False, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"torchrun did not finish in 240 s\n{error.stdout}\n{error.stderr}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert done.stdout.count("done: best mean validation Dice") == 1, done.stdout

    ranks = [torch.load(run / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world_size"] == 2
    for part in ("net", "balancer", "optimizer"):
        found = differences(ranks[0][part], ranks[1][part], part)
        assert not found, "ranks ended different:\n" + "\n".join(found[:20])
    last = load_last(run)
    assert last["world_size"] == 2 and last["progress"]["step"] == 4  # 2 epochs x 2 cases per rank
    assert not differences(last["modules"]["net"], ranks[0]["net"])
    assert not all_finite(last["modules"]["net"]) and not all_finite(last["modules"]["balancer"])

    # one set of outputs, written by rank 0
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]
    telemetry = read_csv(run / "telemetry.csv")
    assert [int(r["step"]) for r in telemetry] == [1, 2, 3, 4]
    if balancer["balancer.name"] == "cggm":
        assert all(math.isfinite(float(r[f"B/{m}"])) for r in telemetry for m in MODALITIES)
    else:
        assert int(ranks[0]["balancer"]["updates"]) == 1
    val = sorted(json.loads((run / "split.json").read_text())["folds"][0]["val"])
    validated = json.loads((run / "validation" / "epoch0002.json").read_text())
    assert sorted(r["case_id"] for r in validated) == val  # gathered from both ranks
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["world_size"], summary["train_cases"], summary["val_cases"]) == (2, 4, 2)
    if "ranks_consistent" in summary:  # the trainer's own digest of each rank's state
        assert summary["ranks_consistent"] is True and len(summary["rank_state_checksums"]) == 2

    # a run of 2 processes resumes only with 2
    with pytest.raises(ConfigurationError, match="2 process"):
        Trainer(resolve_config("cpu-small", run / "config.yaml"), run, CPU, resume=True, report=quiet)


# ---------------------------------------------------------- 8. MMPareto on the segmentation network
def test_mmpareto_trains_the_branches_and_logs_its_weights(phantoms, tmp_path):
    """MMPareto needs only the auxiliary heads: per branch encoder the cosine between the fused
    and the unimodal gradient, the unimodal weight alpha_u and the rescale factor, every step."""
    run = tmp_path / "run"
    config = tiny_config(phantoms, balancer__name="mmpareto", optim__epochs=1)
    summary = Trainer(config, run, CPU, report=quiet).fit()
    assert math.isfinite(summary["best_val_dice_mean"])
    telemetry = read_csv(run / "telemetry.csv")
    for m in MODALITIES:
        for key in (f"cos/{m}", f"alpha_u/{m}", f"scale/{m}"):
            values = [float(row[key]) for row in telemetry]
            assert values and all(math.isfinite(v) for v in values), key
        assert all(0.0 <= float(row[f"alpha_u/{m}"]) <= 1.0 for row in telemetry)
    assert set(load_last(run)["modules"]) == {"net", "balancer"}


# ------------------------------------------- 9. AGM, MSLR and G-Blending on the segmentation network
def test_agm_mono_modal_response_is_the_network_under_a_one_sequence_mask(phantoms):
    """AGM's response for a sequence, decoded from the training pass's pyramids, is what the
    network predicts with only that sequence switched on by its modality mask."""
    from brats_cggm.training.components import network_from_config
    from brats_cggm.training.mono_modal import MonoModalResponses

    torch.manual_seed(0)
    net = network_from_config(tiny_config(phantoms).network)
    image = torch.randn(2, 4, 16, 16, 16)
    responses = MonoModalResponses(net)
    _, pyramids = net.forward_with_pyramids(image)
    responses.remember(pyramids)
    for index, name in enumerate(MODALITIES):
        mask = torch.zeros(2, 4, dtype=torch.bool)
        mask[:, index] = True
        assert torch.allclose(responses({}, name), net(image, modality_mask=mask), atol=1e-6), name


def test_agm_trains_the_segmentation_network_with_dice_scored_responses(phantoms, tmp_path, monkeypatch):
    no_plots(monkeypatch)
    run = tmp_path / "run"
    config = tiny_config(phantoms, balancer__name="agm", balancer__options={"alpha": 0.5}, optim__epochs=1)
    summary = Trainer(config, run, CPU, report=quiet).fit()
    assert math.isfinite(summary["best_val_dice_mean"])
    telemetry = read_csv(run / "telemetry.csv")
    assert telemetry
    for row in telemetry:
        scores = [float(row[f"score/{m}"]) for m in MODALITIES]
        ratios = [float(row[f"ratio/{m}"]) for m in MODALITIES]
        assert all(0.0 <= s <= 1.0 for s in scores)  # soft Dice of each one-sequence response
        assert sum(ratios) == pytest.approx(4.0, rel=1e-5)  # strength over the mean strength
        for m, ratio in zip(MODALITIES, ratios):
            expected = min(max(math.exp(0.5 * (1.0 - ratio)), 0.1), 10.0)
            assert float(row[f"coef/{m}"]) == pytest.approx(expected, rel=1e-5)
    first = telemetry[0]  # the first step's strength is its score
    assert [float(first[f"strength/{m}"]) for m in MODALITIES] == pytest.approx(
        [float(first[f"score/{m}"]) for m in MODALITIES], rel=1e-6)


def test_mslr_adapts_each_encoders_learning_rate_from_its_heads_validation_dice(phantoms, tmp_path, monkeypatch):
    """Validated after every epoch; min_delta 2 (more than any Dice can gain) makes every
    validation after the first a stall: the scales go 1 -> 0.5 -> 0.25, and each branch's param
    group runs at scale x lr x the schedule, while the rest of the network keeps lr x the schedule."""
    no_plots(monkeypatch)
    run = tmp_path / "run"
    config = tiny_config(phantoms, balancer__name="mslr", balancer__options={"min_delta": 2.0, "decay": 0.5},
                         validation__every=1, optim__epochs=3)
    Trainer(config, run, CPU, report=quiet).fit()
    telemetry = read_csv(run / "telemetry.csv")
    steps_per_epoch = len(telemetry) // 3
    for epoch, scale in enumerate((1.0, 1.0, 0.5)):  # epoch 1's validation improves on -inf
        for row in telemetry[epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch]:
            assert [float(row[f"scale/{m}"]) for m in MODALITIES] == [scale] * 4
    last = load_last(run)
    assert last["modules"]["balancer"]["scales"].tolist() == [0.25] * 4
    groups = last["optimizer"]["param_groups"]
    rest = groups[len(MODALITIES)]
    assert [g["modality"] for g in groups[:4]] == list(MODALITIES) and "modality" not in rest
    for group in groups[:4]:
        assert group["lr"] == pytest.approx(0.25 * rest["lr"], rel=1e-9)
    assert last["scheduler"]["base_lrs"][:5] == pytest.approx([0.25 * config.optim.lr] * 4 + [config.optim.lr])


def test_gblending_weights_follow_the_heads_train_and_validation_losses(phantoms, tmp_path, monkeypatch):
    """Each validation logs every head's loss on the validation cases; the weights are
    re-estimated from the losses of consecutive validations (super_epoch 1) and equal
    G-Blending's rule applied to the logged rows."""
    from multimodal_general.balance.gblending import blending_weights

    no_plots(monkeypatch)
    run = tmp_path / "run"
    config = tiny_config(phantoms, balancer__name="gblending", balancer__options={"super_epoch": 1},
                         validation__every=1, optim__epochs=3)
    Trainer(config, run, CPU, report=quiet).fit()
    rows = read_metrics(run)
    keys = ("fused", *MODALITIES)

    def measured(row):
        return {"fused": (row["train_loss"], row["val_loss"]),
                **{m: (row[f"head_loss/{m}"], row[f"val_head_loss/{m}"]) for m in MODALITIES}}

    expected = [0.2] * 5
    for before, after in itertools.pairwise(rows):
        expected = blending_weights(measured(before), measured(after), keys) or expected
    state = load_last(run)["modules"]["balancer"]
    assert state["updates"] == 2
    assert state["weights"].tolist() == pytest.approx(expected, rel=1e-5)
    telemetry = read_csv(run / "telemetry.csv")
    assert {f"weight/{m}" for m in MODALITIES} | {"weight_fused"} <= set(telemetry[0])


def test_baselines_that_cannot_serve_segmentation_say_why(phantoms):
    with pytest.raises(ConfigurationError, match="ogm_ge .*agm"):
        resolve_config("cpu-small", overrides={"balancer.name": "ogm_ge"})
    with pytest.raises(ConfigurationError, match="unknown balancer option"):
        resolve_config("cpu-small", overrides={"balancer.options": {"alhpa": 1.0}})
    with pytest.raises(ConfigurationError, match="rho"):
        resolve_config("cpu-small", overrides={"balancer.name": "agm", "balancer.options": {"rho": 2.0}})


@pytest.mark.parametrize("method, options", [("mslr", {"min_delta": 2.0}), ("gblending", {"super_epoch": 1})])
def test_validation_time_updates_resume_as_an_uninterrupted_run(phantoms, tmp_path, monkeypatch, method, options):
    """2 epochs, then resumed to 3: the same bits as 3 epochs straight (MSLR's encoder rates in
    the optimizer and scheduler, G-Blending's last measurement in the checkpoint)."""
    no_plots(monkeypatch)
    settings = {"balancer__name": method, "balancer__options": options, "validation__every": 1,
                "optim__schedule": "none"}
    a, b = tmp_path / "a", tmp_path / "b"
    Trainer(tiny_config(phantoms, optim__epochs=3, **settings), a, CPU, report=quiet).fit()
    Trainer(tiny_config(phantoms, optim__epochs=2, **settings), b, CPU, report=quiet).fit()
    Trainer(tiny_config(phantoms, optim__epochs=3, **settings), b, CPU, resume=True, report=quiet).fit()
    assert_same_training_state(a, b)
    assert without_timing(read_metrics(a)) == without_timing(read_metrics(b))


# ------------------------------------------------------- weights-only initialisation
def test_init_starts_from_another_runs_weights_and_nothing_else(straight, phantoms, tmp_path):
    from brats_cggm.training import checkpoint

    lines: list[str] = []
    run = tmp_path / "fine_tuned"
    trainer = Trainer(tiny_config(phantoms, init=str(straight.run)), run, CPU, report=lines.append)
    expected = checkpoint.network_weights(checkpoint.load(straight.run / "checkpoints" / "best.pt"))
    state = trainer.parts.net.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    assert (trainer.state.epoch, trainer.state.step) == (0, 0)  # progress, optimizer, schedule start afresh
    assert any(line.startswith("network initialised from") and "best.pt" in line for line in lines)
    assert yaml.safe_load((run / "config.yaml").read_text())["init"] == str(straight.run)


def test_init_from_a_different_network_is_refused_before_anything_is_written(straight, phantoms, tmp_path):
    from brats_cggm.errors import IncompatibleModel

    run = tmp_path / "other"
    with pytest.raises(IncompatibleModel, match=r"best.pt: its network does not match this run's"):
        Trainer(tiny_config(phantoms, init=str(straight.run), network__fusion="hemis"), run, CPU)
    assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()


def test_the_cpu_real_preset_is_the_real_data_recipe():
    config = resolve_config("cpu-real")
    assert config.preprocessing.spacing == (2.0, 2.0, 2.0) and config.preprocessing.patch_size == (64, 64, 64)
    assert config.network.fusion == "hemis" and config.network.sequence_dropout > 0  # any subset works
    assert config.preprocessing.bias_field > 0 and config.optim.optimizer == "adamw"
    from brats_cggm.training.components import network_from_config

    net = network_from_config(config.network)
    assert net.fusion_name == "hemis" and 64 % net.divisor == 0
