"""Training on cases that lack sequences (``data.partial``, ``train --partial``): the absent
sequences are zero channels switched off by the modality mask, their heads get no loss and
their balancer no term, and ``check --partial`` accepts such cases."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from training_cases import CPU, EARLY_FUSION, read_csv, read_metrics, tiny_config
from typer.testing import CliRunner

from brats_cggm import MODALITIES, cli
from brats_cggm.data.layouts import describe_sequences, discover
from brats_cggm.data.phantom import write_phantoms
from brats_cggm.data.transforms import (
    PreprocessConfig,
    case_to_dict,
    train_transforms,
    val_transforms,
)
from brats_cggm.errors import ConfigurationError, InconsistentCase
from brats_cggm.training import Trainer
from brats_cggm.training.cases import select_cases
from brats_cggm.training.components import build_components
from brats_cggm.training.trainer import FeatureNet, train_step

#: the sequences the partial phantoms keep (as the BraTS 2015 copies in ../shared do)
KEPT = ("flair", "t1ce")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """6 phantom cases; 3 of them (the last by name) keep only FLAIR and T1ce."""
    out = tmp_path_factory.mktemp("mixed")
    write_phantoms(out, 6, size=32, layout="brats2021", seed=0)
    for case in discover(out).cases[3:]:
        for modality, path in zip(MODALITIES, case.images):
            if modality not in KEPT:
                path.unlink()
    return out


def quiet(line: str) -> None:
    pass


def test_partial_cases_are_an_error_without_partial_and_a_case_with_it(mixed):
    with pytest.raises(InconsistentCase, match="missing sequence.*pass --partial"):
        select_cases(tiny_config(mixed).data)
    chosen = select_cases(tiny_config(mixed, data__partial=True).data)
    everything = chosen.train + chosen.val
    assert len(everything) == 6
    assert describe_sequences(everything) == "3 with all four sequences, 3 with flair, t1ce"


def test_a_partial_case_becomes_four_channels_with_zeros_and_its_mask(mixed):
    case = discover(mixed, partial=True).cases[-1]
    config = PreprocessConfig(spacing=(7.5, 7.5, 7.5), patch_size=(16, 16, 16), num_samples=1)
    data = val_transforms(config)(case_to_dict(case))
    assert data["image"].shape[0] == 4
    assert data["available"].tolist() == [m in KEPT for m in MODALITIES]
    for index, modality in enumerate(MODALITIES):
        assert bool(data["image"][index].abs().sum() > 0) == (modality in KEPT), modality
    (patch,) = train_transforms(config)(case_to_dict(case))
    assert patch["image"].shape == (4, 16, 16, 16) and patch["available"].tolist() == data["available"].tolist()


def test_a_step_on_a_partial_batch_leaves_absent_branches_and_heads_untouched(mixed):
    config = tiny_config(mixed, data__partial=True, balancer__preset="paper")
    parts = build_components(config, 10, torch.device("cpu"))
    model = FeatureNet(parts.net)
    torch.manual_seed(0)
    image = torch.randn(2, 4, 16, 16, 16)
    image[:, [1, 3]] = 0
    target = (torch.rand(2, 3, 16, 16, 16) > 0.7).float()
    available = torch.tensor([[m in KEPT for m in MODALITIES]] * 2)
    before = {name: [p.detach().clone() for p in parts.net.encoder(name).parameters()] for name in MODALITIES}
    heads_before = {name: [p.detach().clone() for p in parts.balancer.heads[name].parameters()] for name in MODALITIES}
    previous = parts.balancer.previous_eps.clone()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    result = train_step(model, parts, scaler, {"image": image, "available": available}, target)

    for name in MODALITIES:
        moved = any(not torch.equal(a, b) for a, b in zip(before[name], parts.net.encoder(name).parameters()))
        head_moved = any(not torch.equal(a, b) for a, b in zip(heads_before[name], parts.balancer.heads[name].parameters()))
        # AdamW's weight decay moves every parameter a little: compare with the gradient instead
        grads = [p.grad for p in parts.net.encoder(name).parameters()]
        if name in KEPT:
            assert moved and head_moved, name
            assert any(g is not None and g.abs().sum() > 0 for g in grads), name
        else:
            assert all(g is None or g.abs().sum() == 0 for g in grads), name
            assert all(p.grad is None or p.grad.abs().sum() == 0 for p in parts.balancer.heads[name].parameters()), name
    telemetry = result.telemetry
    assert {k for k in telemetry if k.startswith("head_loss/")} == {f"head_loss/{m}" for m in KEPT}
    for name in MODALITIES:
        assert math.isnan(telemetry[f"eps/{name}"]) == (name not in KEPT), name
        assert math.isnan(telemetry[f"cos/{name}"]) == (name not in KEPT), name
    # an absent sequence's utilization keeps its last value: no improvement, no signal
    for index, name in enumerate(MODALITIES):
        if name not in KEPT:
            assert parts.balancer.previous_eps[index] == previous[index]
            assert telemetry[f"d/{name}"] == 0.0


@pytest.mark.parametrize("balancer", ["cggm", "none"])
def test_a_run_on_mixed_cases_trains_and_reports_what_it_measured(mixed, tmp_path, balancer):
    run = tmp_path / "run"
    lines: list[str] = []
    config = tiny_config(mixed, data__partial=True, balancer__name=balancer, optim__epochs=2)
    summary = Trainer(config, run, CPU, report=lines.append).fit()
    assert math.isfinite(summary["best_val_dice_mean"])
    assert any("training cases:" in line and "with flair, t1ce" in line for line in lines)
    rows = read_metrics(run)
    for row in rows:  # the heads' means are over the steps that measured them
        for name in MODALITIES:
            assert math.isfinite(row[f"head_dice/{name}"]) and 0 <= row[f"head_dice/{name}"] <= 1
    steps = read_csv(run / "telemetry.csv")
    assert any(step["eps/t1"] == "nan" for step in steps) and any(step["eps/t1"] != "nan" for step in steps)


def test_early_fusion_trains_on_partial_cases_with_zero_channels(mixed, tmp_path):
    config = tiny_config(mixed, data__partial=True, network__preset="early_fusion", network__overrides=EARLY_FUSION,
                         balancer__name="none", optim__epochs=1)
    summary = Trainer(config, tmp_path / "run", CPU, report=quiet).fit()
    assert math.isfinite(summary["best_val_dice_mean"])


@pytest.mark.parametrize("balancer", ["mmpareto", "agm", "gblending", "mslr"])
def test_balancers_that_need_every_sequence_refuse_partial_cases(mixed, balancer):
    with pytest.raises(ConfigurationError, match=f"balancer {balancer} cannot train on cases that lack sequences"):
        tiny_config(mixed, data__partial=True, balancer__name=balancer)


def test_check_partial_accepts_the_cases_and_says_what_they_hold(mixed, tmp_path):
    runner = CliRunner()
    refused = runner.invoke(cli.app, ["check", str(mixed)])
    assert refused.exit_code == 2 and "train --partial" in refused.output
    accepted = runner.invoke(cli.app, ["check", str(mixed), "--partial"])
    assert accepted.exit_code == 0, accepted.output
    assert "3 with all four sequences, 3 with flair, t1ce" in accepted.output.replace("\n", " ")


def test_a_partial_folder_missing_every_sequence_is_still_an_error(mixed, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(mixed, data)
    case = discover(data, partial=True).cases[-1]
    for path in case.images:
        if path is not None:
            path.unlink()
    with pytest.raises(InconsistentCase, match="missing sequence"):
        select_cases(tiny_config(data, data__partial=True).data)


def test_evaluate_scores_cases_that_lack_sequences_with_those_they_have(mixed, tmp_path):
    from brats_cggm.evaluation import evaluate_model

    rows, summary, _ = evaluate_model(None, mixed, tmp_path / "scores")
    assert len(rows) == 6 and summary["cases"] == 6
    assert all(math.isfinite(row["dice/WT"]) for row in rows)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_on_mixed_cases_end_identical(mixed, tmp_path):
    """torchrun, 2 ranks: a step where one rank's case lacks T1 and T2 and the other's has them
    must still average the heads' gradients over the same tensors on both (else the all-reduce
    fails or the ranks drift apart)."""
    import subprocess
    import sys

    import yaml
    from training_cases import REPO, TINY, differences, nested, subprocess_env

    config = tmp_path / "tiny.yaml"
    values = {**TINY, "data.dir": str(mixed), "data.partial": True, "optim.epochs": 2, "balancer.name": "cggm"}
    config.write_text(yaml.safe_dump(nested(values), sort_keys=False))
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(Path(__file__).with_name("training_cases.py")), "train", "--config", str(config), "--out", str(run)]
    done = subprocess.run(command, check=False, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ranks = [torch.load(run / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for part in ("net", "balancer", "optimizer"):
        found = differences(ranks[0][part], ranks[1][part], part)
        assert not found, "ranks ended different:\n" + "\n".join(found[:20])


def test_the_train_command_takes_partial(mixed, tmp_path, capsys):
    import yaml
    from training_cases import TINY, in_process, nested

    def brats_cggm(*argv) -> tuple[int, str, str]:
        return in_process(capsys, *argv)

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(nested({**TINY, "optim.epochs": 1}), sort_keys=False))
    code, _, err = brats_cggm("train", "--config", config, "--data", mixed, "--out", tmp_path / "a")
    assert code == 2 and err.startswith("error: ") and "pass --partial" in err, err
    code, out, err = brats_cggm("train", "--config", config, "--data", mixed, "--out", tmp_path / "b", "--partial")
    assert code == 0, out + err
    assert "with flair, t1ce" in out.replace("\n", " ")
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["data"]["partial"] is True
