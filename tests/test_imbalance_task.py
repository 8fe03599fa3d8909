"""The synthetic imbalance task: its data has the promised structure, and a run reports."""

import math

import pytest
import torch

from multimodal_general.balance import BalancerSpec
from multimodal_general.models.probe import probe_accuracy, probe_mae
from multimodal_general.training.imbalance import TASKS, RunConfig, generate, train_and_evaluate


def test_generation_is_deterministic_and_shapes_match():
    task = TASKS["cls3"]
    a, b = generate(task, 50, seed=3), generate(task, 50, seed=3)
    assert set(a.inputs) == {"easy", "slow", "weak"}
    for name in a.inputs:
        assert a.inputs[name].shape == (50, task.input_dim)
        assert torch.equal(a.inputs[name], b.inputs[name])
    assert a.target.shape == (50,) and a.target.max() < task.classes
    assert generate(TASKS["reg2"], 20, seed=0).target.shape == (20, 1)


def test_easy_is_linearly_readable_and_slow_is_not():
    task = TASKS["cls2"]
    train, test = generate(task, 3000, seed=0), generate(task, 2000, seed=1)
    chance = 1 / task.classes
    easy = probe_accuracy(train.inputs["easy"], train.target, test.inputs["easy"], test.target, task.classes)
    slow = probe_accuracy(train.inputs["slow"], train.target, test.inputs["slow"], test.target, task.classes)
    assert easy > 0.6
    assert slow < chance + 0.05  # E[x | y] = 0: nothing for a linear model before learning


def test_probe_mae_of_a_linear_target_is_its_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 4, generator=g)
    y = (x @ torch.tensor([1.0, -2.0, 0.5, 0.0])).unsqueeze(1) + 0.1 * torch.randn(2000, 1, generator=g)
    assert probe_mae(x[:1000], y[:1000], x[1000:], y[1000:]) < 0.1


@pytest.mark.parametrize(("task", "balancer", "preset"), [("cls2", "cggm", "stable"), ("reg2", "none", "stable"), ("cls3", "cggm", "official")])
def test_a_short_run_reports_metrics_probes_and_telemetry(task, balancer, preset):
    result = train_and_evaluate(
        RunConfig(task=task, balancer=BalancerSpec(balancer, preset), epochs=1, train_size=640, val_size=400)
    )
    names = {s.name for s in TASKS[task].modalities}
    assert set(result["probe"]) == names
    metric = "fused_acc" if TASKS[task].kind == "classification" else "fused_mae"
    assert math.isfinite(result[metric])
    assert len(result["telemetry"]) == 10 and result["step_ms"] > 0
    if balancer == "cggm":
        assert {f"B/{n}" for n in names} <= set(result["telemetry"][-1])
