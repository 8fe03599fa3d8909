"""One option style for the two command lines: the same concept has the same option name and
value syntax in ``brats-cggm`` and ``multimodal-general``; the former spellings still work.

Options are read from the Typer apps (no process started); the options' effect is checked
where it is cheap: a run folder holding only a ``config.yaml`` makes ``train --resume``
compare the command's settings with the run's and refuse a changed one before anything runs.
The exact command plus ``--resume`` continuing a run: tests/test_training.py (brats-cggm) and
tests/test_general_tasks.py (multimodal-general)."""

from __future__ import annotations

import pytest
import typer
import yaml
from typer.testing import CliRunner

from brats_cggm.cli import app as brats_app
from multimodal_general.cli import app as general_app

#: (command, option) that both command lines have, with the same meaning
SHARED = [
    ("train", option) for option in ("--out", "--data", "--balancer", "--cggm-preset", "--rho", "--lam",
                                      "--balancer-option", "--epochs", "--lr", "--device", "--resume")
] + [
    ("compare", option) for option in ("--out", "--data", "--methods", "--seeds", "--epochs", "--balancer-option")
] + [("evaluate", option) for option in ("--run", "--data", "--split", "--checkpoint")]


def options(app: typer.Typer, command: str) -> dict[str, bool]:
    """``{option name: hidden}`` of one command."""
    params = typer.main.get_command(app).commands[command].params
    return {name: getattr(p, "hidden", False) for p in params for name in p.opts}


def invoke(app: typer.Typer, *args) -> tuple[int, str]:
    """(exit status, the one-line message of a user error or the output)."""
    from multimodal_general.errors import UserError

    result = CliRunner().invoke(app, [str(a) for a in args])
    if isinstance(result.exception, UserError):
        return 2, str(result.exception)
    return result.exit_code, result.output


@pytest.mark.parametrize("command, option", SHARED)
def test_both_command_lines_have_the_option(command, option):
    for app in (brats_app, general_app):
        assert options(app, command).get(option) is False, (command, option, sorted(options(app, command)))


def test_the_former_cggm_preset_option_is_hidden_but_accepted():
    assert options(general_app, "train")["--preset"] is True  # multimodal-general's former name
    assert options(brats_app, "train")["--preset"] is False  # brats-cggm's training preset: another concept


# ------------------------------------------------------------------ brats-cggm train --resume
@pytest.fixture
def brats_run(tmp_path):
    from brats_cggm.training import resolve_config

    run = tmp_path / "run"
    run.mkdir()
    resolve_config("cpu-small", None, {"data.dir": str(tmp_path)}).save(run / "config.yaml")
    return run


@pytest.mark.parametrize("option, named", [
    (["--cggm-preset", "paper"], "balancer.preset 'stable' -> 'paper'"),
    (["--rho", "2.5"], "balancer.rho 1.0 -> 2.5"),
    (["--lam", "0.3"], "balancer.lam 0.1 -> 0.3"),
    (["--balancer-option", "alpha=0.5"], "balancer.options.alpha None -> 0.5"),
])
def test_brats_train_options_reach_the_configuration(brats_run, option, named):
    code, message = invoke(brats_app, "train", "--out", brats_run, *option, "--resume")
    assert code == 2 and named in message, message


@pytest.mark.parametrize("app", [brats_app, general_app], ids=["brats-cggm", "multimodal-general"])
@pytest.mark.parametrize("name, own", [("rho", "--rho"), ("lam", "--lam"), ("preset", "--cggm-preset")])
def test_a_setting_with_its_own_option_is_no_balancer_option(app, name, own, tmp_path):
    args = ["--task", "mosi", "--data", tmp_path] if app is general_app else []
    code, message = invoke(app, "train", *args, "--out", tmp_path / "run", "--balancer-option", f"{name}=1")
    assert code == 2 and f"has an option of its own, {own}" in message, message
    assert not (tmp_path / "run").exists()


def test_brats_compare_passes_balancer_options_to_every_run(monkeypatch, tmp_path):
    import brats_cggm.compare

    seen = {}

    def fake_compare(data, methods, seeds, out, **options):
        seen.update(options["settings"])
        raise SystemExit(0)

    monkeypatch.setattr(brats_cggm.compare, "compare", fake_compare)
    code, output = invoke(brats_app, "compare", "--data", tmp_path, "--out", tmp_path / "c",
                          "--balancer-option", "alpha=0.5", "--set", "optim.lr=0.1")
    assert code == 0, output
    assert seen == {"balancer.options.alpha": 0.5, "optim.lr": 0.1}


# ------------------------------------------------------------ multimodal-general train --resume
@pytest.fixture
def general_run(tmp_path):
    from multimodal_general.balance import BalancerSpec
    from multimodal_general.training.runner import TrainSettings

    run = tmp_path / "run"
    run.mkdir()
    settings = TrainSettings(task="mosi", data=str(tmp_path), balancer=BalancerSpec("cggm"))
    (run / "config.yaml").write_text(yaml.safe_dump({"settings": settings.to_dict(), "seeds": [0]}))
    return run


@pytest.mark.parametrize("option, named", [
    (["--cggm-preset", "paper"], "--cggm-preset 'stable' -> 'paper'"),
    (["--preset", "official"], "--preset 'stable' -> 'official'"),
    (["--lam", "0.3"], "--lam 0.1 -> 0.3"),
    (["--device", "auto", "--lr", "0.5"], "--lr 0.001 -> 0.5"),  # auto: cpu without CUDA, the run's own
])
def test_general_train_options_reach_the_settings(general_run, monkeypatch, option, named):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, message = invoke(general_app, "train", "--task", "mosi", "--data", general_run.parent, "--out", general_run,
                           "--balancer", "cggm", *option, "--resume")
    assert code == 2 and named in message and "--device" not in message, message


def test_both_spellings_of_the_cggm_preset_must_agree(tmp_path):
    code, message = invoke(general_app, "train", "--task", "mosi", "--data", tmp_path, "--out", tmp_path / "run",
                           "--preset", "paper", "--cggm-preset", "stable")
    assert code == 2 and "--preset is the former name of --cggm-preset" in message, message
