"""What does a BraTS training step cost with CGGM? The trainer's optimizer step for four
variants, measured side by side in one run (CPU)::

    python bench/training_speed.py                    # 48^3 patches, batch 2, 5 rounds (~2 min; more when busy)
    python bench/training_speed.py --quick            # 32^3, 2 rounds (~1 min, mostly start-ups)
    OMP_WAIT_POLICY=PASSIVE python bench/training_speed.py   # on a busy machine, see below
    python bench/training_speed.py --patch 64 --repeats 8

Variants (``--variants``), built with :func:`build_components` from
``resolve_config("cpu-small", overrides=...)``:

* ``mb-none``: the multi-branch ``small`` network, balancer ``none`` (joint training; the
  four auxiliary heads are still trained on detached features, as in the trainer);
* ``mb-cggm-stable`` / ``mb-cggm-paper``: the same network with CGGM, preset ``stable`` /
  ``paper``;
* ``mb-slots-none`` / ``mb-slots-noheads``: slot fusion, joint training with the heads and
  without them (``network.heads: false``: the same network trajectory, no telemetry);
* ``mb-slots-grouped-*``: slot fusion with the branches as one grouped network;
* ``ef-small-none``: the early-fusion baseline at the widths of ``small`` (channels
  8-16-32-64, strides 2-2-2, one residual unit; ``early-fusion-small`` of
  ``bench/network_speed.py``), balancer ``none`` (it has no branches to balance).

**Step time.** One step is exactly what ``Trainer._step`` does on a CPU (autocast off,
``GradScaler`` disabled): ``zero_grad``, forward through :class:`FeatureNet`, the region
loss, ``balancer.extra_loss``, the finite-loss check, backward, ``balancer.modulate``,
``optimizer.step``, ``scheduler.step``. Inputs are random images ``[batch, 4, P, P, P]``
and random 0/1 targets ``[batch, 3, P, P, P]``, made outside the timed region, one batch
per round shared by all variants. After ``--warmup`` untimed rounds, ``--repeats`` rounds
time one step of every variant each, in an order rotated every round, so that the load of
the moment and any drift hit all variants alike. The table gives the median step, and
ratios as the median over rounds of the ratio within the round (paired).

**Memory.** Each variant also runs in a fresh process (this script with ``--one``): it
builds the components and the batch, resets its resident-set high-water mark
(``/proc/self/clear_refs``), reads its resident set (``VmRSS``), runs ``--memory-steps``
steps and reads the high-water mark (``VmHWM``). *step peak MiB* is the difference: what
training adds at its peak on top of the resident interpreter, libraries, weights and batch
(activations kept for backward, gradients, the optimizer's momentum, the balancer's state,
the allocator's slack, and the one-time start-up of torch's thread pool and kernels, the
same for all variants), as the operating system counts it; *peak RSS MiB* is the mark
itself. It is not torch's own allocation count, and it depends on the allocator settings
(``--malloc``; the trainer uses ``tuned``). These processes run after the timing, one at a
time. (``getrusage().ru_maxrss`` cannot be used: Linux carries it over ``fork`` + ``exec``,
so the child reports the benchmark process's own peak.)

**A busy machine.** With other processes on the cores, OpenMP's default spin-waiting makes
2-thread steps erratic: on the project's 2-core VM, with two other busy processes (load
average ~5), 48^3 steps of the multi-branch network took 1.1-22 s with the default and
0.8-1.2 s with ``OMP_WAIT_POLICY=PASSIVE``, and the whole run 5-7 min instead of 1m45
(set it in the environment; it is recorded with the results, and the memory processes
inherit it). The trainer does not set it, so the default measures what the trainer does.

By default glibc keeps freed memory (``--malloc tuned``, :func:`keep_freed_memory`), as
the trainer does on a CPU. The table (Markdown) goes to stdout and to ``--out`` with the
suffix ``.md``; everything, with the provenance and load averages, to ``--out`` (JSON);
both written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from brats_cggm.training.components import Components, build_components
from brats_cggm.training.config import resolve_config
from brats_cggm.training.trainer import FeatureNet, train_step
from multimodal_general.io import atomic_write_text
from multimodal_general.runs.provenance import provenance
from multimodal_general.runs.runtime import (
    RESULT_TAG,
    keep_freed_memory,
    memory_kib,
    print_result,
    reset_peak_memory,
    run_fresh,
)

REPO = Path(__file__).resolve().parents[1]
SMALL_EARLY_FUSION = {"channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1}

#: label -> (description, configuration overrides on top of the cpu-small preset)
VARIANTS: dict[str, tuple[str, dict]] = {
    "mb-none": ("multi-branch small + none", {"network.preset": "small", "balancer.name": "none"}),
    "mb-cggm-stable": (
        "multi-branch small + CGGM stable",
        {"network.preset": "small", "balancer.name": "cggm", "balancer.preset": "stable"},
    ),
    "mb-cggm-paper": (
        "multi-branch small + CGGM paper",
        {"network.preset": "small", "balancer.name": "cggm", "balancer.preset": "paper"},
    ),
    "mb-slots-none": (
        "multi-branch small, slot fusion + none",
        {"network.preset": "small", "network.fusion": "slots", "balancer.name": "none"},
    ),
    "mb-slots-noheads": (
        "multi-branch small, slot fusion + none, no auxiliary heads",
        {"network.preset": "small", "network.fusion": "slots", "balancer.name": "none", "network.heads": False},
    ),
    "mb-slots-grouped-none": (
        "multi-branch small, slot fusion, grouped branches + none",
        {"network.preset": "small", "network.fusion": "slots", "balancer.name": "none",
         "network.overrides": {"grouped": True}},
    ),
    "mb-slots-grouped-cggm-paper": (
        "multi-branch small, slot fusion, grouped branches + CGGM paper",
        {"network.preset": "small", "network.fusion": "slots", "balancer.name": "cggm", "balancer.preset": "paper",
         "network.overrides": {"grouped": True}},
    ),
    "ef-small-none": (
        "early fusion (small widths) + none",
        {"network.preset": "early_fusion", "network.overrides": SMALL_EARLY_FUSION, "balancer.name": "none"},
    ),
}
#: issue 24's candidate screen (2c), declared before any run, for the four-branch network (slot
#: fusion, joint training, no heads) and early fusion: C1 today's widths, C2 twice as wide, C3 one
#: level deeper, C4 C1 on patches 1.5x as large. ``patch_scale``: the variant's patch is that many
#: times ``--patch`` (rounded to a multiple of 16); ``min_patch``: the smallest ``--patch`` it runs at
#: (C3's five levels).
SLOTS = {"network.preset": "small", "network.fusion": "slots", "balancer.name": "none", "network.heads": False}
EARLY = {"network.preset": "early_fusion", "balancer.name": "none"}
WIDE, DEEP = [16, 32, 64, 128], [8, 16, 32, 64, 128]
SCREEN: dict[str, tuple[str, dict]] = {
    "screen-slots-c1": ("C1: 4 branches 8-16-32-64, slots, no heads", SLOTS),
    "screen-slots-c2": ("C2: 4 branches 16-32-64-128", {**SLOTS, "network.overrides": {
        "channels": WIDE, "head_channels": 16}}),
    "screen-slots-c3": ("C3: 4 branches 8-16-32-64-128", {**SLOTS, "network.overrides": {
        "channels": DEEP, "strides": [2] * 5}, "min_patch": 64}),
    "screen-slots-c4": ("C4: C1 on 1.5x patches", {**SLOTS, "patch_scale": 1.5}),
    "screen-ef-c1": ("C1: early fusion 8-16-32-64", {**EARLY, "network.overrides": SMALL_EARLY_FUSION}),
    "screen-ef-c2": ("C2: early fusion 16-32-64-128", {**EARLY, "network.overrides": {
        **SMALL_EARLY_FUSION, "channels": WIDE}}),
    "screen-ef-c3": ("C3: early fusion 8-16-32-64-128", {**EARLY, "network.overrides": {
        **SMALL_EARLY_FUSION, "channels": DEEP, "strides": [2] * 4}, "min_patch": 64}),
    "screen-ef-c4": ("C4: C1 on 1.5x patches", {**EARLY, "network.overrides": SMALL_EARLY_FUSION, "patch_scale": 1.5}),
}
VARIANTS.update(SCREEN)
#: the screen's budget: this many epochs of the reference candidate, in wall time
SCREEN_REFERENCE, SCREEN_EPOCHS = "screen-slots-c1", 150
#: what a variant's entry holds besides configuration overrides
NOT_SETTINGS = ("patch_scale", "min_patch")
BASELINE = "mb-none"
EARLY_FUSION = "ef-small-none"
QUICK = {"patch": 32, "repeats": 2, "warmup": 1}
FULL = {"patch": 48, "repeats": 5, "warmup": 2}
MEMORY_TAG = RESULT_TAG  # the tests read the memory processes' output by it
OMP_VARIABLES = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"a short run: {', '.join(f'--{k} {v}' for k, v in QUICK.items())}")
    parser.add_argument("--patch", type=int, help=f"cubic patch size (default {FULL['patch']})")
    parser.add_argument("--batch", type=int, default=2,
                        help="patches per step (default 2: cpu-small's 1 case x 2 samples)")
    parser.add_argument("--repeats", type=int, help=f"timed rounds (default {FULL['repeats']})")
    parser.add_argument("--warmup", type=int, help=f"untimed rounds first (default {FULL['warmup']})")
    parser.add_argument("--variants", default=",".join(v for v in VARIANTS if v not in SCREEN),
                        help=f"comma-separated, from {', '.join(VARIANTS)} (default: all but screen-*)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                        help="tuned (default, as the trainer): glibc keeps freed memory (keep_freed_memory); "
                             "default: glibc's own thresholds")
    parser.add_argument("--memory-steps", type=int, default=2,
                        help="steps of each fresh memory process (default 2: the first allocates the "
                             "optimizer's momentum, the second runs with it)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory processes")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "training_speed.json",
                        help="JSON output; the Markdown table goes beside it (.md)")
    parser.add_argument("--one", metavar="VARIANT", help=argparse.SUPPRESS)  # the memory child
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS)) + ([args.one] if args.one and args.one not in VARIANTS else [])
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if len(set(args.variants)) != len(args.variants):
        parser.error("--variants must not repeat an entry")
    for key in ("patch", "batch", "repeats", "threads", "memory_steps"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.patch < 32 or args.patch % 16:
        # the small multi-branch network halves 4 times after its strided stem, and instance
        # norm needs more than one voxel at the bottom
        parser.error("--patch must be a multiple of 16 and at least 32")
    small = [v for v in (*args.variants, *([args.one] if args.one else [])) if args.patch < VARIANTS[v][1].get("min_patch", 0)]
    if small:
        parser.error(f"--patch {args.patch} is too small for {', '.join(small)} (five levels: 64 or more)")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


# ------------------------------------------------------------------------- building
def variant_patch(label: str, patch: int) -> int:
    """The cubic patch size of ``label`` at ``--patch patch``."""
    scale = VARIANTS[label][1].get("patch_scale", 1)
    return patch if scale == 1 else 16 * round(patch * scale / 16)


def build(label: str, patch: int, total_steps: int = 10_000) -> Components:
    """The components of a variant on the CPU, with the same initial weights every time."""
    overrides = {k: v for k, v in VARIANTS[label][1].items() if k not in NOT_SETTINGS}
    config = resolve_config("cpu-small", overrides={
        **overrides, "preprocess.patch_size": [variant_patch(label, patch)] * 3, "device": "cpu", "optim.amp": "off",
    })
    torch.manual_seed(config.seed)
    return build_components(config, total_steps, torch.device("cpu"))


def make_batch(patch: int, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Random images and random 0/1 region targets, as the loader's batch dict."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 4, patch, patch, patch, generator=generator)
    label = (torch.rand(batch, 3, patch, patch, patch, generator=generator) < 0.5).float()
    return {"image": image, "label": label}


class Stepper:
    """``Trainer._step`` on a CPU: autocast off (``optim.amp`` auto is off without a GPU),
    the scaler disabled (a pass-through), no DDP."""

    def __init__(self, parts: Components) -> None:
        self.parts = parts
        self.model = FeatureNet(parts.net)
        self.model.train()
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.last_loss = float("nan")

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        result = train_step(self.model, self.parts, self.scaler, batch["image"], batch["label"])
        self.last_loss = result.loss
        return result.telemetry


def parameter_counts(parts: Components) -> dict[str, int]:
    heads = parts.balancer.parameters() if parts.balancer is not None else ()
    return {"params": sum(p.numel() for p in parts.net.parameters()), "head_params": sum(p.numel() for p in heads)}


# ---------------------------------------------------------------------- measuring
def time_steps(args: argparse.Namespace, log) -> tuple[dict[str, dict], list[list[str]]]:
    """Per variant: parameter counts, the timed steps and the last loss; and the order of
    every timed round."""
    labels = list(args.variants)
    steppers = {label: Stepper(build(label, args.patch)) for label in labels}
    times: dict[str, list[float]] = {label: [] for label in labels}
    order_log: list[list[str]] = []
    for round_index in range(args.warmup + args.repeats):
        timed = round_index >= args.warmup
        batches = {size: make_batch(size, args.batch, seed=round_index)
                   for size in {variant_patch(label, args.patch) for label in labels}}
        shift = round_index % len(labels)
        order = labels[shift:] + labels[:shift]
        seconds = {}
        for label in order:
            batch = batches[variant_patch(label, args.patch)]
            start = time.perf_counter()
            steppers[label](batch)
            seconds[label] = time.perf_counter() - start
        if timed:
            order_log.append(order)
            for label in labels:
                times[label].append(seconds[label])
        kind = f"round {round_index - args.warmup + 1}/{args.repeats}" if timed else f"warm-up {round_index + 1}/{args.warmup}"
        log(f"{kind}: " + ", ".join(f"{label} {seconds[label]:.2f} s" for label in order))
    measured = {
        label: {**parameter_counts(steppers[label].parts), "step_s": times[label],
                "final_loss": steppers[label].last_loss}
        for label in labels
    }
    return measured, order_log


def measure_memory_here(args: argparse.Namespace) -> dict:
    """In a fresh process: the resident set just before the steps and its high-water mark
    over them.

    ``VmHWM`` (reset before the steps) and not ``getrusage().ru_maxrss``: Linux carries
    ``ru_maxrss`` over ``fork`` + ``exec`` from the parent, so a child of a process that
    had grown larger reports the parent's peak (every variant read 577 MiB that way).
    """
    stepper = Stepper(build(args.one, args.patch))
    batch = make_batch(variant_patch(args.one, args.patch), args.batch, seed=0)
    reset = reset_peak_memory()
    before = memory_kib("VmRSS")
    if before is None:
        raise RuntimeError("the memory measurement reads /proc/self/status (Linux only)")
    for _ in range(args.memory_steps):
        stepper(batch)
    peak = memory_kib("VmHWM")
    return {
        "rss_before_mib": before / 1024,
        "peak_rss_mib": peak / 1024,
        # without the reset the mark also holds the imports' and the build's peaks
        "step_peak_mib": (peak - before) / 1024 if reset else None,
        "peak_reset": reset,
        "memory_steps": args.memory_steps,
    }


def measure_memory(args: argparse.Namespace, label: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--one", label, "--patch", str(args.patch),
               "--batch", str(args.batch), "--threads", str(args.threads), "--malloc", args.malloc,
               "--memory-steps", str(args.memory_steps)]
    return run_fresh(command, label, cwd=str(REPO))


# ------------------------------------------------------------------------- report
def paired_ratio(times: dict[str, dict], label: str, base: str) -> dict | None:
    if label not in times or base not in times:
        return None
    ratios = [a / b for a, b in zip(times[label]["step_s"], times[base]["step_s"])]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "n": len(ratios)}


def _ratio_text(ratio: dict | None) -> str:
    if ratio is None:
        return "—"
    text = f"{ratio['median']:.2f}x"
    return text if ratio["n"] < 2 else f"{text} ({ratio['min']:.2f}–{ratio['max']:.2f})"


def markdown(payload: dict) -> str:
    s = payload["settings"]
    header = ["variant", "network + balancer", "params (+heads)", "median step s", "min–max s",
              f"× {BASELINE}", f"× {EARLY_FUSION}", "step peak MiB", "peak RSS MiB"]
    title = (
        f"Training step (Trainer._step), {s['patch']}^3 patches, batch {s['batch']}, {s['threads']} threads, "
        f"CPU; {s['repeats']} rounds after {s['warmup']} warm-up, variants interleaved; load average "
        f"before {_load(payload['load_average_before'])}, after {_load(payload['load_average_after'])}"
        + "".join(f"; {k}={v}" for k, v in payload["environment"].items() if v is not None)
    )
    lines = [
        title,
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in payload["rows"]:
        memory = row.get("memory")
        lines.append("| " + " | ".join([
            row["variant"], row["description"],
            f"{row['params'] / 1e6:.3f} M" + (f" (+{row['head_params'] / 1e3:.1f} k)" if row["head_params"] else ""),
            f"{row['median_step_s']:.3f}", f"{min(row['step_s']):.3f}–{max(row['step_s']):.3f}",
            _ratio_text(row["ratio_vs_baseline"]), _ratio_text(row["ratio_vs_early_fusion"]),
            f"{memory['step_peak_mib']:.0f}" if memory and memory["step_peak_mib"] is not None else "—",
            f"{memory['peak_rss_mib']:.0f}" if memory else "—",
        ]) + " |")
    note = (
        "Ratios: median over rounds of the ratio of the two steps timed in the same round (min–max). "
        "*step peak MiB*: high-water mark of the resident set over "
        f"{s['memory_steps']} steps in a fresh process, minus its resident set just before them "
        "(activations, gradients, optimizer and balancer state, allocator slack, and the one-time "
        "start-up of torch's thread pool and kernels); *peak RSS MiB*: the high-water mark itself "
        "(with the interpreter, torch, MONAI, weights and batch)."
    )
    lines += ["", note]
    budget = [row for row in payload["rows"] if row.get("screen_epochs")]
    if budget:
        lines += ["", f"Screen budget (issue 24, 2c): epochs in the wall time of {SCREEN_EPOCHS} epochs of "
                      f"{SCREEN_REFERENCE}, from the paired ratios: "
                  + ", ".join(f"{row['variant']} {row['screen_epochs']}" for row in budget) + "."]
    return "\n".join(lines) + "\n"


def screen_epochs(measured: dict[str, dict], label: str) -> int | None:
    """``label``'s epochs at the screen's equal wall time (``None`` outside the screen, or
    without its reference in the run)."""
    ratio = paired_ratio(measured, label, SCREEN_REFERENCE) if label in SCREEN else None
    return round(SCREEN_EPOCHS / ratio["median"]) if ratio else None


def _load(values: Sequence[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    malloc_tuned = keep_freed_memory() if args.malloc == "tuned" else False
    if args.one:
        print_result({"variant": args.one, "malloc_tuned": malloc_tuned, **measure_memory_here(args)})
        return 0

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    load_before = os.getloadavg()
    began = time.perf_counter()
    measured, order = time_steps(args, log)
    memory = {}
    if not args.no_memory:
        for label in args.variants:
            log(f"memory: {label} in a fresh process")
            memory[label] = measure_memory(args, label)
    rows = []
    for label in args.variants:
        row = {"variant": label, "description": VARIANTS[label][0], "overrides": VARIANTS[label][1],
               "patch": variant_patch(label, args.patch),
               **measured[label], "median_step_s": statistics.median(measured[label]["step_s"]),
               "ratio_vs_baseline": paired_ratio(measured, label, BASELINE),
               "ratio_vs_early_fusion": paired_ratio(measured, label, EARLY_FUSION),
               "screen_epochs": screen_epochs(measured, label), "memory": memory.get(label)}
        rows.append(row)
    payload = {
        **provenance("monai"),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_s": time.perf_counter() - began,
        "malloc_tuned": malloc_tuned,
        "environment": {name: os.environ.get(name) for name in OMP_VARIABLES},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "one")},
        "round_orders": order,
        "rows": rows,
    }
    table = markdown(payload)
    print(table)
    atomic_write_text(args.out, json.dumps(payload, indent=2) + "\n")
    atomic_write_text(args.out.with_suffix(".md"), f"```\n{payload['command']}\n```\n\n" + table)
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
