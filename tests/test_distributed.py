"""CGGM under torch.distributed: two CPU processes (gloo) with DistributedDataParallel.

``tests/distributed_worker.py`` trains the same LateFusionNet + CGGM on two ranks, each on
its own local batch, and saves per-step telemetry and final parameters. The checks here:

* every rank computes the same coefficients ``B`` at every step (the per-modality metric
  sums are all-reduced before ``B`` is computed);
* the ``eps`` the balancer reports is the global one: the mean of the ranks' local head
  accuracies (equal local batch sizes), and the local accuracies do differ;
* after training, model and unimodal-head parameters are bitwise equal on both ranks
  (encoder gradients are scaled identically after DDP's all-reduce, head gradients are
  averaged by the balancer).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("distributed_worker.py")
REPO = WORKER.parent.parent
PRESETS = ("stable", "paper")
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[str, list[dict]]:
    """Launch the two-process run once; ``{preset: [rank0 record, rank1 record]}``."""
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(WORKER), "--out", str(out), "--presets", *PRESETS,
    ]
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(
            f"distributed worker did not finish in {TIMEOUT_S} s\n"
            f"--- stdout ---\n{error.stdout}\n--- stderr ---\n{error.stderr}"
        )
    if done.returncode != 0:
        pytest.fail(
            f"distributed worker failed with exit status {done.returncode}\n"
            f"--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}"
        )
    files = [out / f"rank{r}.pt" for r in range(2)]
    missing = [str(f) for f in files if not f.exists()]
    assert not missing, f"worker exited 0 but wrote no {missing}\n{done.stderr}"
    loaded = [torch.load(f, weights_only=False) for f in files]
    return {preset: [rank[preset] for rank in loaded] for preset in PRESETS}


def assert_state_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), (
            f"{what} '{key}' differs between ranks: max |diff| "
            f"{(a[key].double() - b[key].double()).abs().max().item():.3e}"
        )


@pytest.mark.parametrize("preset", PRESETS)
def test_ranks_agree_on_coefficients_and_parameters(ranks, preset):
    r0, r1 = ranks[preset]
    assert (r0["rank"], r1["rank"]) == (0, 1) and r0["world_size"] == 2
    steps = r0["B"].shape[0]
    assert steps >= 8 and r0["B"].shape == (steps, 2)

    # The test means something only if the ranks saw different data ...
    local_differs = (r0["local_acc"] != r1["local_acc"]).any(dim=1)
    assert local_differs.any(), "both ranks had identical local head accuracies at every step"

    # ... and still computed one B per step, identical on every rank.
    assert torch.isfinite(r0["B"]).all() and torch.isfinite(r1["B"]).all()
    for step in range(steps):
        assert torch.equal(r0["B"][step], r1["B"][step]), (
            f"step {step}: rank 0 B={r0['B'][step].tolist()}, rank 1 B={r1['B'][step].tolist()}"
        )
    assert torch.equal(r0["d"], r1["d"])
    assert torch.equal(r0["eps"], r1["eps"])
    # B is not trivially 1: the coefficients did modulate something.
    assert (r0["B"] != 1).any(), f"B stayed 1 at every step: {r0['B'].tolist()}"

    # eps is the global utilization: the mean of the ranks' local accuracies (equal batches).
    expected_eps = (r0["local_acc"] + r1["local_acc"]) / 2
    torch.testing.assert_close(r0["eps"].double(), expected_eps, rtol=0, atol=1e-6)

    # Identical parameters after training, and training did change them.
    assert_state_equal(r0["model"], r1["model"], "model parameter")
    assert_state_equal(r0["heads"], r1["heads"], "head parameter")
    assert_state_equal(r0["balancer_state"], r1["balancer_state"], "balancer state")
    assert_state_equal(r0["initial_model"], r1["initial_model"], "initial model parameter")
    changed = [k for k in r0["model"] if not torch.equal(r0["model"][k], r0["initial_model"][k])]
    assert len(changed) == len(r0["model"]), "some model parameters were never updated"
    for key, value in {**r0["model"], **r0["heads"]}.items():
        assert torch.isfinite(value).all(), f"{key} is not finite"
