"""How fast are the segmentation networks? Multi-branch presets next to early fusion, measured
side by side in one run (batch 1, fwd+bwd)::

    python bench/network_speed.py                        # 64^3 and 96^3, 2 threads
    python bench/network_speed.py --sizes 64,96,128      # adds 128^3 (several minutes)
    python bench/network_speed.py --sizes 32 --repeats 1 # quick

For every patch size, the step of every network (``--networks``) is timed once per round,
round after round (``--repeats`` rounds after one warm-up round), so that all networks
share the machine's load of the moment; the table shows the fastest step of each (the one
least slowed by other processes) and its ratio to the early-fusion baseline of the same
width. Columns:

* **step s**: forward + ``logits.sum()`` backward of the network alone;
* **+heads s**: the same plus the four CGGM auxiliary heads on the detached branch features
  (what a CGGM training step adds; multi-branch only);
* **GFLOP**: forward + backward, counted by ``torch.utils.flop_counter.FlopCounterMode``
  (convolutions and matrix products; elementwise ops, norms and activations are not counted);
* **saved MiB**: tensors kept for backward (a proxy for the training step's peak memory).

A second table splits the FLOPs of each multi-branch network by stage: branches (the four
encoders), fusion (masked means are elementwise, no counted FLOPs; HeMIS and attention add
1x1x1 convolutions), decoder, output conv,
heads (training only), each forward + backward, counted stage by stage on detached inputs.

By default glibc is told to keep freed memory (``--malloc tuned``, see
:func:`keep_freed_memory`), as a CPU trainer should; ``--malloc default`` measures without.

The tables go to stdout; everything, with versions and the command line, to ``--out``
(JSON, written atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from brats_cggm.network import MultiBranchUNet, build_network, make_auxiliary_heads
from multimodal_general.balance.base import detached
from multimodal_general.io import atomic_write_text
from multimodal_general.runs.provenance import provenance
from multimodal_general.runs.runtime import keep_freed_memory

REPO = Path(__file__).resolve().parents[1]

#: label -> (preset, overrides, baseline label for the ratio)
NETWORKS: dict[str, tuple[str, dict, str]] = {
    "early-fusion": ("early_fusion", {}, "early-fusion"),
    "early-fusion-small": (
        "early_fusion", {"channels": (8, 16, 32, 64), "num_res_units": 1}, "early-fusion-small"
    ),
    "multi-branch-default": ("default", {}, "early-fusion"),
    "multi-branch-small": ("small", {}, "early-fusion-small"),
    "multi-branch-small-hemis": ("small", {"fusion": "hemis"}, "early-fusion-small"),
    "multi-branch-small-attention": ("small", {"fusion": "attention"}, "early-fusion-small"),
    "multi-branch-small-slots": ("small", {"fusion": "slots"}, "early-fusion-small"),
    # the same network, its four branches run as one grouped network (brats_cggm.network.grouped)
    "multi-branch-small-slots-grouped": ("small", {"fusion": "slots", "grouped": True}, "early-fusion-small"),
    "multi-branch-default-slots": ("default", {"fusion": "slots"}, "early-fusion"),
    "multi-branch-default-slots-grouped": ("default", {"fusion": "slots", "grouped": True}, "early-fusion"),
    # design check: the default without the strided stem (every level at twice the resolution)
    "multi-branch-full-res-stem": ("default", {"strides": (1, 2, 2, 2)}, "early-fusion"),
}
DEFAULT_NETWORKS = ("early-fusion", "early-fusion-small", "multi-branch-default", "multi-branch-small",
                    "multi-branch-small-hemis", "multi-branch-small-attention", "multi-branch-small-slots",
                    "multi-branch-small-slots-grouped", "multi-branch-default-slots",
                    "multi-branch-default-slots-grouped")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,96", help="cubic patch sizes (default 64,96)")
    parser.add_argument("--networks", default=",".join(DEFAULT_NETWORKS),
                        help=f"comma-separated, from {', '.join(NETWORKS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                        help="tuned (default): glibc keeps freed memory instead of returning it to the "
                             "system (see keep_freed_memory); default: glibc's own thresholds")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "network_speed.json")
    args = parser.parse_args(argv)
    args.sizes = [int(v) for v in args.sizes.split(",") if v]
    args.networks = [v for v in args.networks.split(",") if v]
    unknown = sorted(set(args.networks) - set(NETWORKS))
    if unknown:
        parser.error(f"unknown network(s) {unknown}; choose from {', '.join(NETWORKS)}")
    return args


# ------------------------------------------------------------------------- measuring
def build(label: str) -> tuple[torch.nn.Module, dict]:
    preset, overrides, _ = NETWORKS[label]
    torch.manual_seed(0)
    net = build_network(preset, **overrides)
    heads = make_auxiliary_heads(net) if isinstance(net, MultiBranchUNet) else {}
    return net, {name: head for name, (head, _) in heads.items()}


def step(net, heads: dict, image: torch.Tensor) -> None:
    """Forward + backward of the network, and of the heads on detached branch features."""
    logits, features = net.forward_with_features(image)
    loss = logits.float().sum()
    for name, head in heads.items():
        loss = loss + head(detached(features[name])).float().sum()
    loss.backward()
    net.zero_grad(set_to_none=True)
    for head in heads.values():
        head.zero_grad(set_to_none=True)


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def flops(fn: Callable[[], object]) -> tuple[object, float]:
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, counter.get_total_flops() / 1e9


def saved_mib(net, heads: dict, image: torch.Tensor) -> float:
    """MiB of distinct tensors that autograd keeps for backward in one step."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(net, heads, image)
    return sum(storages.values()) / 2**20


def stage_flops(net: MultiBranchUNet, heads: dict, image: torch.Tensor) -> dict[str, float]:
    """GFLOP (forward + backward) per stage; each stage runs on detached inputs so that
    its backward is counted on its own."""
    keep = torch.ones(image.shape[0], len(net.modalities), dtype=torch.bool)
    branch_features, branches_fwd = flops(lambda: net.encode(image, keep))
    leaves = [[f.detach().requires_grad_() for f in levels] for levels in branch_features]
    fused, fusion_fwd = flops(lambda: net.fuse(leaves, keep))
    fused_leaves = [f.detach().requires_grad_() for f in fused]
    hidden, decoder_fwd = flops(lambda: net.decoder(fused_leaves))
    hidden_leaf = hidden.detach().requires_grad_()
    logits, output_fwd = flops(lambda: net.output_conv(hidden_leaf))
    _, output_bwd = flops(lambda: logits.sum().backward())
    _, decoder_bwd = flops(lambda: hidden.backward(hidden_leaf.grad))
    _, fusion_bwd = flops(lambda: torch.autograd.backward(fused, [f.grad for f in fused_leaves]))
    _, branches_bwd = flops(lambda: torch.autograd.backward(
        [f for levels in branch_features for f in levels], [f.grad for levels in leaves for f in levels]))
    heads_total = 0.0
    for index, name in enumerate(net.modalities):
        prediction, fwd = flops(partial(heads[name], detached(branch_features[index])))
        _, bwd = flops(prediction.sum().backward)
        heads_total += fwd + bwd
    net.zero_grad(set_to_none=True)
    return {
        "branches": branches_fwd + branches_bwd,
        "fusion": fusion_fwd + fusion_bwd,
        "decoder": decoder_fwd + decoder_bwd,
        "output_conv": output_fwd + output_bwd,
        "heads (training only)": heads_total,
    }


def measure_size(size: int, labels: Sequence[str], repeats: int, console: Console) -> list[dict]:
    image = torch.randn(1, 4, size, size, size)
    built = {label: build(label) for label in labels}
    for net, _ in built.values():
        net.train()
    times: dict[str, list[float]] = {label: [] for label in labels}
    with_heads: dict[str, list[float]] = {label: [] for label in labels}
    for round_index in range(repeats + 1):  # round 0 warms up
        console.log(f"{size}^3: round {round_index}/{repeats}")
        for label in labels:
            net, heads = built[label]
            seconds = timed(partial(step, net, {}, image))
            seconds_heads = timed(partial(step, net, heads, image)) if heads else None
            if round_index:
                times[label].append(seconds)
                if seconds_heads is not None:
                    with_heads[label].append(seconds_heads)
    rows = []
    for label in labels:
        net, heads = built[label]
        _, total = flops(partial(step, net, {}, image))
        row = {
            "network": label, "preset": NETWORKS[label][0], "overrides": NETWORKS[label][1],
            "baseline": NETWORKS[label][2], "size": size,
            "params": sum(p.numel() for p in net.parameters()),
            "head_params": sum(p.numel() for h in heads.values() for p in h.parameters()),
            "step_s": times[label], "step_with_heads_s": with_heads[label],
            "gflop": total, "saved_mib": saved_mib(net, {}, image),
            "stages_gflop": stage_flops(net, heads, image) if heads else None,
        }
        rows.append(row)
    for row in rows:
        base = next((r for r in rows if r["network"] == row["baseline"]), None)
        row["ratio"] = min(row["step_s"]) / min(base["step_s"]) if base else None
    return rows


# --------------------------------------------------------------------------- report
def speed_table(rows: list[dict], threads: int) -> Table:
    out = Table(title=f"fwd+bwd, batch 1, {threads} threads (fastest of the rounds; ratio to the "
                      "early-fusion net of the same width, same size)")
    for name in ("size", "network", "params", "step s", "ratio", "+heads s", "GFLOP", "saved MiB"):
        out.add_column(name, justify="right")
    for r in rows:
        out.add_row(
            f"{r['size']}^3", r["network"], f"{r['params'] / 1e6:.2f} M", f"{min(r['step_s']):.2f}",
            "—" if r["ratio"] is None else f"{r['ratio']:.2f}x",
            f"{min(r['step_with_heads_s']):.2f}" if r["step_with_heads_s"] else "—",
            f"{r['gflop']:.1f}", f"{r['saved_mib']:.0f}",
        )
    return out


def stage_table(rows: list[dict]) -> Table:
    stages = next(r["stages_gflop"] for r in rows if r["stages_gflop"])
    out = Table(title="Multi-branch GFLOP (fwd+bwd) per stage, share of the network's own FLOPs")
    out.add_column("size", justify="right")
    out.add_column("network")
    for stage in stages:
        out.add_column(stage, justify="right")
    for r in rows:
        if not r["stages_gflop"]:
            continue
        own = sum(v for k, v in r["stages_gflop"].items() if not k.startswith("heads"))
        out.add_row(f"{r['size']}^3", r["network"],
                    *(f"{v:.2f} ({100 * v / own:.0f}%)" for v in r["stages_gflop"].values()))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    malloc_tuned = keep_freed_memory() if args.malloc == "tuned" else False
    console = Console(width=max(Console().width, 140))
    load_before = os.getloadavg()
    rows = [row for size in args.sizes for row in measure_size(size, args.networks, args.repeats, console)]
    console.print(speed_table(rows, args.threads))
    console.print(stage_table(rows))
    payload = {
        **provenance("monai"),
        "load_average_before": load_before,
        "malloc_tuned": malloc_tuned,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
    }
    atomic_write_text(args.out, json.dumps(payload, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
