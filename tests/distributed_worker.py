"""Worker of ``tests/test_distributed.py``; run it under torchrun with two processes::

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=2 \
        tests/distributed_worker.py --out DIR --presets stable paper

Every rank builds the same LateFusionNet + CGGM (same seed), wraps the model in
DistributedDataParallel (gloo, CPU) and trains a few steps on its OWN local batch, following
the loop contract of ``multimodal_general.balance.base``, once per preset (one launch serves
several presets: starting the processes costs far more than training). It writes
``DIR/rank{r}.pt``, a dict ``{preset: record}`` where a record holds each step's coefficients
``B``, the balancer's (all-reduced) ``eps``, the rank's own head accuracies on its local batch,
and the initial and final model and head parameters; the test compares the two files.
Any failure ends the process with a non-zero status and a message on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from multimodal_general.balance import BalancerSpec
from multimodal_general.training.imbalance import TASKS, RunConfig, build, generate

STEPS = 8
LOCAL_BATCH = 32
SEED = 1234
# "paper" is unguarded (B can reach ~1e6 when the improvements cancel): a small lr keeps
# the parameters finite over a few steps.
LEARNING_RATE = {"stable": 0.05, "paper": 1e-5, "official": 1e-3}


class WorkerFailure(RuntimeError):
    pass


def local_head_accuracy(balancer, features, target) -> torch.Tensor:
    """Each head's accuracy on this rank's batch, computed here, independently of the
    balancer's bookkeeping (same heads, same detached features)."""
    with torch.no_grad():
        return torch.stack(
            [
                (balancer.heads[name](features[name].detach()).argmax(dim=1) == target)
                .double()
                .mean()
                for name in balancer.modality_names
            ]
        )


def run(preset: str) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(SEED)  # identical initial model and heads on every rank
    config = RunConfig(task="cls2", balancer=BalancerSpec("cggm", preset), lr=LEARNING_RATE[preset])
    model, balancer, criterion = build(config)
    initial_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ddp = DistributedDataParallel(model)
    optimizers = (
        torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9),
        torch.optim.SGD(balancer.parameters(), lr=config.lr, momentum=0.9),
    )
    # One data set, the same on every rank; each rank reads a different slice of it.
    data = generate(TASKS[config.task], world * STEPS * LOCAL_BATCH, seed=7)

    record: dict[str, list] = {"B": [], "eps": [], "local_acc": [], "d": [], "grad_norm": []}
    for step in range(STEPS):
        start = (step * world + rank) * LOCAL_BATCH
        inputs, target = data.batch(torch.arange(start, start + LOCAL_BATCH))
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        output, features = ddp(inputs)
        task_loss = criterion(output, target)
        loss = task_loss + balancer.extra_loss(features, output, target, task_loss)
        local_acc = local_head_accuracy(balancer, features, target)
        loss.backward()
        telemetry = balancer.modulate()
        for optimizer in optimizers:
            optimizer.step()
        b = telemetry.per_modality["B"]
        if not torch.isfinite(b).all():
            raise WorkerFailure(f"rank {rank}, step {step}: B is not finite: {b.tolist()}")
        record["B"].append(b.clone())
        record["eps"].append(telemetry.per_modality["eps"].clone())
        record["d"].append(telemetry.per_modality["d"].clone())
        record["grad_norm"].append(telemetry.per_modality["grad_norm"].clone())
        record["local_acc"].append(local_acc)

    for name, p in list(model.named_parameters()) + list(balancer.named_parameters()):
        if not torch.isfinite(p).all():
            raise WorkerFailure(f"rank {rank}: parameter {name} is not finite after training")

    result = {key: torch.stack(values) for key, values in record.items()}
    result["rank"] = rank
    result["world_size"] = world
    result["preset"] = preset
    result["local_batch"] = LOCAL_BATCH
    result["initial_model"] = initial_model
    result["model"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result["heads"] = {k: v.detach().clone() for k, v in balancer.heads.state_dict().items()}
    result["balancer_state"] = {
        k: v.detach().clone() for k, v in balancer.state_dict().items() if isinstance(v, torch.Tensor)
    }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--presets", nargs="+", default=["stable", "paper"], choices=sorted(LEARNING_RATE)
    )
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "-1"))
    try:
        if "RANK" not in os.environ:
            raise WorkerFailure("not started by torch.distributed.run (no RANK in the environment)")
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        if dist.get_world_size() != 2:
            raise WorkerFailure(f"expected 2 processes, got {dist.get_world_size()}")
        results = {preset: run(preset) for preset in args.presets}
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(results, args.out / f"rank{dist.get_rank()}.pt")
        dist.barrier()
    except Exception as error:  # report, then fail the process
        print(f"[distributed_worker rank {rank}] FAILED: {error!r}", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
