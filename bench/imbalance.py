"""Does CGGM balance? A multi-seed benchmark on the synthetic imbalance tasks.

For every task x method x seed this trains :func:`train_and_evaluate` and reports the
fused held-out metric, a linear probe per modality (how much each encoder learned), how
many runs diverged, and the step time next to joint training measured in the same run::

    python bench/imbalance.py --quick                     # demo: 2 seeds, 2 epochs
    python bench/imbalance.py                             # 5 seeds, 8 epochs, all tasks
    python bench/imbalance.py --tasks cls2 --methods none,cggm-stable --seeds 3

Methods are ``none`` (joint training) and ``cggm-<preset>`` for any CGGM preset
(``paper``, ``official``, ``stable``). The loop is seed-major: within a seed, every method
of a task runs back to back (in an order rotated per seed), so step-time ratios compare
runs made on the same machine at the same time.

A run *diverges* when its fused metric, a probe metric or any telemetry value is not
finite. Diverged runs are counted, never dropped silently: tables show ``k/n`` diverged and
means/stds over the finite runs only (``—`` when none is finite). For every run the first
step with a non-finite value or with ``|B| > --b-limit`` and the largest finite ``|B|`` are
recorded.

Outputs in ``--out`` (written atomically: temp file + ``os.replace``): ``results.json``
(every run's results and telemetry summary, without the per-step telemetry, plus the
aggregated tables), ``results.md`` (the Markdown tables, command line at the top) and
``<task>_telemetry.png`` per task (``B_i`` over training for the first seed of every CGGM
preset; ``eps_i`` and the applied encoder gradient norm for ``none`` vs ``cggm-stable``).

Evaluation uses the task's held-out validation split (never trained on or selected on); no
hyperparameter is chosen on it here.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from multimodal_general.balance import CGGM_METHODS, CGGM_PRESETS, BalancerSpec
from multimodal_general.experiments.harness import markdown_table, rotated
from multimodal_general.experiments.imbalance_comparison import method_spec
from multimodal_general.io import atomic_write, atomic_write_text, json_safe
from multimodal_general.runs.provenance import provenance
from multimodal_general.runs.series import mean_std, moving_average, smoothing_label, smoothing_window
from multimodal_general.training.imbalance import TASKS, RunConfig, train_and_evaluate

REPO = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = ("none", *CGGM_METHODS)
QUICK = {"seeds": 2, "epochs": 2, "train_size": 2000, "val_size": 2000}
FULL = {"seeds": 5, "epochs": 8, "train_size": RunConfig.train_size, "val_size": RunConfig.val_size}
B_YLIM = (-1.0, 3.0)


# --------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Does CGGM balance? Multi-seed benchmark on the synthetic imbalance tasks.",
    )
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)} (default: all)")
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS),
        help="comma-separated: 'none', any balancer, or 'cggm-<preset>' with preset in "
        + ", ".join(CGGM_PRESETS) + f" (default: {','.join(DEFAULT_METHODS)})",
    )
    parser.add_argument("--seeds", type=int, default=None, help=f"number of seeds 0..n-1 (default {FULL['seeds']}, quick {QUICK['seeds']})")
    parser.add_argument("--epochs", type=int, default=None, help=f"default {FULL['epochs']}, quick {QUICK['epochs']}")
    parser.add_argument("--train-size", type=int, default=None, help=f"default {FULL['train_size']}, quick {QUICK['train_size']}")
    parser.add_argument("--val-size", type=int, default=None, help=f"default {FULL['val_size']}, quick {QUICK['val_size']}")
    parser.add_argument("--quick", action="store_true", help="small demo run; explicit options still win")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="output directory (default: bench/results in the repository)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1: stable step times for these tiny models)",
    )
    parser.add_argument("--b-limit", type=float, default=100.0, help="|B| above this counts as a blow-up (default 100)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = parser.parse_args(argv)

    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.tasks = _split(args.tasks)
    args.methods = _split(args.methods)
    for task in args.tasks:
        if task not in TASKS:
            parser.error(f"unknown task {task!r}; choose from {list(TASKS)}")
    for method in args.methods:
        try:
            method_spec(method)
        except ValueError as error:
            parser.error(str(error))
    if len(set(args.methods)) != len(args.methods) or len(set(args.tasks)) != len(args.tasks):
        parser.error("--tasks and --methods must not repeat an entry")
    for key in ("seeds", "epochs", "train_size", "val_size", "threads"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    return args


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# ------------------------------------------------------------ telemetry analysis
def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def series(telemetry: list[dict], key: str) -> np.ndarray:
    return np.array([row.get(key, np.nan) for row in telemetry], dtype=float)


def plateau_step(eps: np.ndarray, fraction: float = 0.9) -> int | None:
    """First step where the smoothed utilization has made ``fraction`` of its total rise."""
    finite = np.isfinite(eps)
    if finite.sum() < 4:
        return None
    smooth = moving_average(eps, smoothing_window(len(eps)))
    start, top = smooth[np.isfinite(smooth)][0], np.nanmax(smooth)
    if not top > start:
        return None
    reached = np.nonzero(smooth >= start + fraction * (top - start))[0]
    return int(reached[0]) if len(reached) else None


def summarize_telemetry(telemetry: list[dict], modalities: Sequence[str], b_limit: float) -> dict:
    """What the per-step telemetry says, in a few numbers (the steps are not kept)."""
    steps = len(telemetry)
    nonfinite = [
        i for i, row in enumerate(telemetry) if any(not _finite(v) for v in row.values())
    ]
    first_nonfinite = nonfinite[0] if nonfinite else None
    healthy = slice(0, first_nonfinite if first_nonfinite is not None else steps)
    summary: dict = {
        "steps": steps,
        "nonfinite_steps": len(nonfinite),
        "first_nonfinite_step": first_nonfinite,
        "first_nonfinite_keys": (
            sorted(k for k, v in telemetry[first_nonfinite].items() if not _finite(v))
            if first_nonfinite is not None else []
        ),
    }
    summary.update(_b_summary(telemetry, modalities, b_limit, healthy))
    candidates = [s for s in (summary["first_nonfinite_step"], summary["first_B_blowup_step"]) if s is not None]
    summary["first_bad_step"] = min(candidates) if candidates else None
    summary["phases"] = _phases(telemetry, modalities, healthy)
    last = max(1, steps // 8)
    summary["final_eps"] = {m: _nanstat(np.nanmean, series(telemetry, f"eps/{m}")[-last:]) for m in modalities}
    # Collapse without NaN (dead ReLUs after reversed or huge steps): an encoder whose
    # gradient is exactly zero over the last eighth of the run no longer learns at all.
    if first_nonfinite is None and steps:
        tail = {m: series(telemetry, f"grad_norm/{m}")[-last:] for m in modalities}
        summary["final_grad_norm"] = {m: float(np.mean(v)) for m, v in tail.items()}
        summary["dead_encoders"] = [m for m, v in tail.items() if np.all(v == 0)]
    else:
        summary["final_grad_norm"], summary["dead_encoders"] = None, []
    summary["collapsed"] = bool(modalities) and len(summary["dead_encoders"]) == len(modalities)
    return summary


def _b_summary(telemetry: list[dict], modalities: Sequence[str], b_limit: float, healthy: slice) -> dict:
    """CGGM's coefficients B: their largest size, blow-ups past ``b_limit``, and (over the
    ``healthy`` steps, before the first non-finite one) their sign, median and mean."""
    b = {m: series(telemetry, f"B/{m}") for m in modalities}
    if not any(np.isfinite(v).any() for v in b.values()):
        return {"max_abs_B": None, "first_B_blowup_step": None, "B_blowup_steps": 0}
    stacked = np.stack([b[m] for m in modalities], axis=1)  # [steps, M]
    magnitude = np.abs(stacked)
    blown = np.nonzero((np.where(np.isfinite(magnitude), magnitude, 0.0) > b_limit).any(axis=1))[0]
    pre = stacked[healthy]
    finite_abs = magnitude[np.isfinite(magnitude)]
    return {
        "max_abs_B": float(finite_abs.max()) if finite_abs.size else None,
        "first_B_blowup_step": int(blown[0]) if len(blown) else None,
        "B_blowup_steps": int(len(blown)),
        "negative_B_step_fraction": float(np.mean((pre < 0).any(axis=1))) if len(pre) else None,
        "unmodulated_step_fraction": float(np.mean((pre == 1.0).all(axis=1))) if len(pre) else None,
        "B_median": {m: _nanstat(np.nanmedian, b[m][healthy]) for m in modalities},
        "B_mean": {m: _nanstat(np.nanmean, b[m][healthy]) for m in modalities},
    }


def _phases(telemetry: list[dict], modalities: Sequence[str], healthy: slice) -> dict:
    """Medians and means of the telemetry before and after the dominant ("easy", else first)
    modality's utilization plateaus."""
    lead = "easy" if "easy" in modalities else modalities[0]
    eps = {m: series(telemetry, f"eps/{m}")[healthy] for m in modalities}
    # Phases only when most of the run stayed finite: a plateau found in the few steps
    # before a divergence says nothing.
    plateau = plateau_step(eps[lead]) if len(eps[lead]) >= len(telemetry) / 2 else None
    phases: dict = {"lead_modality": lead, "plateau_step": plateau}
    if plateau is not None:
        for phase, part in (("before", slice(0, plateau)), ("after", slice(plateau, None))):
            entry: dict = {"steps": len(range(*part.indices(len(eps[lead]))))}
            for key in ("eps", "d", "B", "grad_norm"):
                values = {m: series(telemetry, f"{key}/{m}")[healthy][part] for m in modalities}
                if all(np.isnan(v).all() for v in values.values()):
                    continue
                entry[f"{key}_median"] = {m: _nanstat(np.nanmedian, v) for m, v in values.items()}
                entry[f"{key}_mean"] = {m: _nanstat(np.nanmean, v) for m, v in values.items()}
            phases[phase] = entry
    return phases


def _nanstat(fn: Callable, values: np.ndarray) -> float | None:
    values = np.asarray(values, dtype=float)
    if not np.isfinite(values).any():
        return None
    return float(fn(values[np.isfinite(values)]))


# ------------------------------------------------------------------------- runs
def metric_key(task: str) -> str:
    return "fused_acc" if TASKS[task].kind == "classification" else "fused_mae"


def run_one(config: RunConfig, b_limit: float, progress: Callable[[], None] | None = None) -> tuple[dict, list[dict]]:
    """One training run: the result without telemetry (plus its summary), and the telemetry."""
    stamps = [time.perf_counter()]

    def on_epoch() -> None:
        stamps.append(time.perf_counter())
        if progress is not None:
            progress()

    result = train_and_evaluate(config, progress=on_epoch)
    wall = time.perf_counter() - stamps[0]
    telemetry = result.pop("telemetry")
    # Step time per epoch from wall-clock epoch times (includes batch indexing). The first
    # interval also holds data generation and model building: dropped when there are more.
    per_epoch = len(telemetry) / max(config.epochs, 1)
    epoch_ms = [1000 * (b - a) / per_epoch for a, b in zip(stamps, stamps[1:])] if per_epoch else []
    epoch_ms = epoch_ms[1:] if len(epoch_ms) > 1 else epoch_ms
    modalities = [s.name for s in TASKS[config.task].modalities]
    summary = summarize_telemetry(telemetry, modalities, b_limit)
    fused = result[metric_key(config.task)]
    reasons = []
    if not _finite(fused):
        reasons.append("fused metric")
    if any(not _finite(v) for v in result["probe"].values()):
        reasons.append("probe")
    if summary["nonfinite_steps"]:
        reasons.append("telemetry")
    result.update(
        {
            "task": config.task,
            "seed": config.seed,
            "fused": fused,
            "wall_s": wall,
            "epoch_step_ms": epoch_ms,
            "best_epoch_step_ms": min(epoch_ms) if epoch_ms else None,
            "diverged": bool(reasons),
            "diverged_because": reasons,
            "telemetry_summary": summary,
        }
    )
    return result, telemetry


def warm_up(tasks: Sequence[str], methods: Sequence[str]) -> None:
    """One tiny run per task and method, discarded: one-time costs stay out of step times."""
    for task in tasks:
        for method in methods:
            train_and_evaluate(
                RunConfig(task=task, seed=10_000, epochs=1, train_size=256, val_size=256, balancer=method_spec(method))
            )


# --------------------------------------------------------------------- aggregate
def aggregate(results: list[dict], tasks: Sequence[str], methods: Sequence[str]) -> dict:
    """Per task and method: means/stds over the finite runs, divergence, step times."""
    table: dict = {}
    for task in tasks:
        modalities = [s.name for s in TASKS[task].modalities]
        rows = {}
        baseline = {
            r["seed"]: r["best_epoch_step_ms"]
            for r in results if r["task"] == task and r["method"] == "none" and "error" not in r
        }
        for method in methods:
            runs = [r for r in results if r["task"] == task and r["method"] == method]
            ok = [r for r in runs if "error" not in r]
            finite = [r for r in ok if not r["diverged"]]
            summaries = [r["telemetry_summary"] for r in ok]
            bad_steps = [s["first_bad_step"] for s in summaries if s["first_bad_step"] is not None]
            max_b = [s["max_abs_B"] for s in summaries if s.get("max_abs_B") is not None]
            ratios = [
                r["best_epoch_step_ms"] / baseline[r["seed"]]
                for r in ok if baseline.get(r["seed"]) and r["best_epoch_step_ms"]
            ]
            row = {
                "runs": len(runs),
                "errors": len(runs) - len(ok),
                "diverged": sum(r["diverged"] for r in ok),
                "fused": _ms([r["fused"] for r in finite]),
                "probe": {m: _ms([r["probe"][m] for r in finite]) for m in modalities},
                "step_ms": _ms([r["step_ms"] for r in ok]),
                "best_epoch_step_ms": _ms([r["best_epoch_step_ms"] for r in ok]),
                "step_ratio_vs_none": (
                    {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "n": len(ratios)}
                    if method != "none" and ratios else None
                ),
                "B_blowup_runs": sum(s.get("first_B_blowup_step") is not None for s in summaries),
                "first_bad_step": (
                    {"median": statistics.median(bad_steps), "min": min(bad_steps), "max": max(bad_steps), "runs": len(bad_steps)}
                    if bad_steps else None
                ),
                "first_nonfinite_steps": [s["first_nonfinite_step"] for s in summaries],
                "first_B_blowup_steps": [s["first_B_blowup_step"] for s in summaries],
                "max_abs_B": max(max_b) if max_b else None,
                "negative_B_step_fraction": _ms([s.get("negative_B_step_fraction") for s in summaries]),
                "plateau_step": _ms([s["phases"]["plateau_step"] for s in summaries]),
                "B_median_after_plateau": {
                    m: _ms([
                        s["phases"].get("after", {}).get("B_median", {}).get(m) for s in summaries
                    ])
                    for m in modalities
                },
                "collapsed_runs": sum(bool(s.get("collapsed")) for s in summaries),
                "dead_encoder_runs": sum(bool(s.get("dead_encoders")) for s in summaries),
                "eps_median_after_plateau": {
                    m: _ms([
                        s["phases"].get("after", {}).get("eps_median", {}).get(m) for s in summaries
                    ])
                    for m in modalities
                },
                "B_median_before_plateau": {
                    m: _ms([
                        s["phases"].get("before", {}).get("B_median", {}).get(m) for s in summaries
                    ])
                    for m in modalities
                },
            }
            rows[method] = row
        table[task] = {"kind": TASKS[task].kind, "metric": metric_key(task), "modalities": modalities, "methods": rows}
    return table


def _ms(values: Sequence[float | None]) -> dict:
    """Mean and std (None below two values) over the finite values, with their count."""
    n = sum(_finite(v) for v in values)
    mean, std = mean_std(values)
    return {"mean": mean if n else None, "std": std if n > 1 else None, "n": n}


# ---------------------------------------------------------------------- format
def fmt_stat(stat: dict | None, kind: str) -> str:
    """``87.9 ± 0.4`` (accuracy in %), ``0.129 ± 0.004`` (MAE); ``—`` when no finite run."""
    if not stat or stat["mean"] is None:
        return "—"
    scale, digits = (100.0, 1) if kind == "classification" else (1.0, 3)
    text = f"{stat['mean'] * scale:.{digits}f}"
    if stat["std"] is not None:
        text += f" ± {stat['std'] * scale:.{digits}f}"
    return text


def fmt_num(value: float | None, spec: str = ".3g") -> str:
    return "—" if value is None else format(value, spec)


def table_rows(task_table: dict) -> tuple[list[str], list[list[str]]]:
    kind, modalities = task_table["kind"], task_table["modalities"]
    unit = "acc % ↑" if kind == "classification" else "MAE ↓"
    header = [
        "method", f"fused {unit}", *(f"probe {m} ({unit})" for m in modalities),
        "diverged", "|B|>limit", "first bad step", "max |B|", "step ms", "× none",
    ]
    rows = []
    for method, row in task_table["methods"].items():
        bad = row["first_bad_step"]
        ratio = row["step_ratio_vs_none"]
        rows.append(
            [
                method,
                fmt_stat(row["fused"], kind) + ("" if not row["errors"] else f" ({row['errors']} errors)"),
                *(fmt_stat(row["probe"][m], kind) for m in modalities),
                f"{row['diverged']}/{row['runs'] - row['errors']}"
                + (f" (+{row['collapsed_runs']} collapsed)" if row["collapsed_runs"] else ""),
                f"{row['B_blowup_runs']}/{row['runs'] - row['errors']}" if method != "none" else "—",
                "—" if bad is None else (
                    f"{bad['median']:g}" + ("" if bad["min"] == bad["max"] else f" ({bad['min']}–{bad['max']})")
                ),
                fmt_num(row["max_abs_B"]),
                fmt_num(row["step_ms"]["mean"], ".2f"),
                "1.00" if method == "none" else (
                    "—" if not ratio else
                    f"{ratio['median']:.2f}" + ("" if ratio["n"] < 2 else f" ({ratio['min']:.2f}–{ratio['max']:.2f})")
                ),
            ]
        )
    return header, rows


def telemetry_rows(task_table: dict) -> tuple[list[str], list[list[str]]]:
    modalities = task_table["modalities"]
    lead = "easy" if "easy" in modalities else modalities[0]
    header = [
        "method", f"{lead} plateau step",
        *(f"median B_{m} before → after" for m in modalities),
        "median eps after plateau (" + " / ".join(modalities) + ")",
        "steps with a B < 0 (before divergence)",
    ]
    rows = []
    for method, row in task_table["methods"].items():
        neg = row["negative_B_step_fraction"]["mean"]
        eps_after = [row["eps_median_after_plateau"][m]["mean"] for m in modalities]
        rows.append(
            [
                method,
                fmt_num(row["plateau_step"]["mean"], ".0f")
                + ("" if row["plateau_step"]["n"] in (0, row["runs"] - row["errors"]) else f" (n={row['plateau_step']['n']})"),
                *(
                    "—" if method == "none" else
                    f"{fmt_num(row['B_median_before_plateau'][m]['mean'], '.2f')} → "
                    f"{fmt_num(row['B_median_after_plateau'][m]['mean'], '.2f')}"
                    for m in modalities
                ),
                "—" if all(v is None for v in eps_after) else " / ".join(fmt_num(v, ".2f") for v in eps_after),
                "—" if neg is None else f"{100 * neg:.0f}%",
            ]
        )
    return header, rows


def rich_table(title: str, header: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        diverged = row[header.index("diverged")].split("/")[0]
        table.add_row(*row, style=None if diverged == "0" else "red")
    return table


def divergence_notes(task_table: dict, b_limit: float) -> list[str]:
    notes = []
    for method, row in task_table["methods"].items():
        if not row["diverged"] and not row["B_blowup_runs"] and not row["dead_encoder_runs"]:
            continue
        nonfinite = [s for s in row["first_nonfinite_steps"] if s is not None]
        blowups = [s for s in row["first_B_blowup_steps"] if s is not None]
        notes.append(
            f"- **{method}**: {row['diverged']}/{row['runs']} runs non-finite"
            + (f" (first non-finite step per run: {nonfinite})" if nonfinite else "")
            + f"; {row['B_blowup_runs']} with |B| > {b_limit:g}"
            + (f" (first at steps {blowups})" if blowups else "")
            + f"; max |B| {fmt_num(row['max_abs_B'])}"
            + (
                f"; {row['dead_encoder_runs']} finite run(s) ended with a dead encoder "
                f"(all-zero gradient), {row['collapsed_runs']} with all encoders dead (collapsed)"
                if row["dead_encoder_runs"] else ""
            )
            + "."
        )
    return notes


# ------------------------------------------------------------------------ plots
@dataclass(frozen=True)
class Frame:
    """What every panel of a task's telemetry figure shares."""

    modalities: list[str]
    colors: dict
    seed: int
    steps: int  # the longest run's steps
    steps_per_epoch: int

    @property
    def full_range(self) -> tuple[float, float]:
        return -0.02 * self.steps, 1.02 * self.steps

    @property
    def step_label(self) -> str:
        return f"training step ({self.steps_per_epoch} steps per epoch)" if self.steps_per_epoch else "training step"


def plot_task(
    task: str, telemetries: dict[str, list[dict]], seed: int, epochs: int, path: Path, rho: float, b_limit: float
) -> bool:
    """``B_i`` per CGGM preset, then ``eps_i`` and applied encoder gradient norms for
    ``none`` vs ``cggm-stable``. Returns whether a figure was written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = TASKS[task]
    modalities = [s.name for s in spec.modalities]
    cggm = [m for m in telemetries if m in CGGM_METHODS]
    compare = [m for m in ("none", "cggm-stable") if m in telemetries]
    panels = len(cggm) + (2 if compare else 0)
    if not panels:
        return False
    steps = max(len(t) for t in telemetries.values())
    frame = Frame(modalities, {m: plt.get_cmap("tab10")(i) for i, m in enumerate(modalities)}, seed, steps,
                  steps // max(1, epochs))
    fig, axes = plt.subplots(panels, 1, figsize=(11, 3.0 * panels + 0.6), squeeze=False, layout="constrained")
    axes = axes[:, 0]
    for ax, method in zip(axes, cggm):
        _b_panel(ax, frame, method, telemetries[method], rho, b_limit, last=ax is axes[-1])
    if compare:
        eps_label = "batch accuracy of head i" if spec.kind == "classification" else "−MAE of head i on the batch"
        _utilization_panels(axes[len(cggm)], axes[len(cggm) + 1], frame, {m: telemetries[m] for m in compare},
                            eps_label)
    axes[-1].set_xlabel(frame.step_label)
    fig.suptitle(f"{task} ({spec.kind}; modalities: {', '.join(modalities)}) — CGGM telemetry", fontsize=12)
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    plt.close(fig)
    return True


def _b_panel(ax, frame: Frame, method: str, telemetry: list[dict], rho: float, b_limit: float, last: bool) -> None:
    """One CGGM preset's ``B_i`` over training: raw and smoothed, clipped to :data:`B_YLIM` (values
    outside marked), blow-up and divergence marked, zoomed onto a run that diverged early."""
    x = np.arange(len(telemetry))
    low, high = B_YLIM
    outside, raw_min, raw_max = 0, np.inf, -np.inf
    summary = summarize_telemetry(telemetry, frame.modalities, b_limit)
    end = summary["first_nonfinite_step"]  # B after a non-finite step means nothing
    # A run that diverged early would be a sliver of a full-length axis: zoom in on it.
    shown = len(telemetry) if end is None else min(len(telemetry), max(2 * end + 10, frame.steps_per_epoch))
    zoomed = shown < len(telemetry)
    window = smoothing_window(shown)
    for m in frame.modalities:
        color = frame.colors[m]
        raw = series(telemetry, f"B/{m}")
        if end is not None:
            raw[end:] = np.nan
        finite = raw[np.isfinite(raw)]
        if finite.size:
            raw_min, raw_max = min(raw_min, finite.min()), max(raw_max, finite.max())
        ax.plot(x, raw, color=color, lw=0.6, alpha=0.25)
        smooth = moving_average(raw, window)
        if end is not None:
            smooth[end:] = np.nan
        ax.plot(x, smooth, color=color, lw=2.0, label=f"B_{m} ({smoothing_label(window)})")
        above, below = np.isfinite(raw) & (raw > high), np.isfinite(raw) & (raw < low)
        outside += int(above.sum() + below.sum())
        inset = 0.03 * (high - low)  # markers just inside the axes (an empty unclipped line breaks layout)
        if above.any():
            ax.plot(x[above], np.full(above.sum(), high - inset), "^", color=color, ms=5, alpha=0.8)
        if below.any():
            ax.plot(x[below], np.full(below.sum(), low + inset), "v", color=color, ms=5, alpha=0.8)
    ax.axhline(1.0, color="0.4", ls="--", lw=1, label="B = 1 (gradient unchanged)")
    ax.axhline(0.0, color="0.7", ls=":", lw=1)
    if summary["first_B_blowup_step"] is not None:
        ax.axvline(summary["first_B_blowup_step"], color="black", ls=":", lw=1.5,
                   label=f"first |B| > {b_limit:g} (step {summary['first_B_blowup_step']})")
    if end is not None:
        ax.axvspan(end, len(telemetry), color="tab:red", alpha=0.08)
        ax.axvline(end, color="tab:red", lw=1.5, label=f"non-finite from step {end}: diverged, B not shown")
    ax.set_ylim(low, high)
    if outside:
        ax.text(
            0.01, 0.96,
            f"y clipped to [{low:g}, {high:g}]: {outside} raw values outside (▲▼), "
            f"raw range [{raw_min:.3g}, {raw_max:.3g}]",
            transform=ax.transAxes, va="top", fontsize=8,
            bbox={"boxstyle": "round", "fc": "white", "ec": "0.7", "alpha": 0.9},
        )
    ax.set_ylabel("B_i (encoder grad scale)")
    ax.set_xlim(*((-0.5, shown - 0.5) if zoomed else frame.full_range))
    ax.set_title(
        f"{method}: balancing coefficients B_i (seed {frame.seed}, rho = {rho:g})"
        + (f" — x zoomed to the first {shown} of {len(telemetry)} steps" if zoomed else ""),
        fontsize=10,
    )
    if zoomed or last:
        ax.set_xlabel(frame.step_label)
    else:
        ax.tick_params(labelbottom=False)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    ax.grid(alpha=0.3)


def _utilization_panels(ax_eps, ax_grad, frame: Frame, telemetries: dict[str, list[dict]], eps_label: str) -> None:
    """``eps_i`` and the applied encoder gradient norm ``B_i·‖g_i‖``, ``none`` (solid) against
    ``cggm-stable`` (dashed)."""
    window = smoothing_window(frame.steps)
    for ax in (ax_eps, ax_grad):
        ax.set_xlim(*frame.full_range)
    ax_eps.tick_params(labelbottom=False)
    for (method, telemetry), style in zip(telemetries.items(), ("-", "--")):
        x = np.arange(len(telemetry))
        for m in frame.modalities:
            eps = series(telemetry, f"eps/{m}")
            ax_eps.plot(x, moving_average(eps, window), color=frame.colors[m], ls=style, lw=1.8,
                        label=f"eps_{m} · {method}")
            grad = series(telemetry, f"grad_norm/{m}")
            if method != "none":
                b = series(telemetry, f"B/{m}")
                grad = grad * np.where(np.isfinite(b), b, np.nan)
            ax_grad.plot(x, moving_average(grad, window), color=frame.colors[m], ls=style, lw=1.8,
                         label=f"{m} · {method}")
    ax_eps.set_ylabel(eps_label)
    ax_eps.set_title(
        f"Head utilization eps_i ({smoothing_label(window)}): none (solid) vs cggm-stable (dashed), seed {frame.seed}",
        fontsize=10,
    )
    ax_grad.set_ylabel("‖applied encoder grad‖")
    ax_grad.set_title(
        f"Applied encoder gradient norm B_i·‖g_i‖ (‖g_i‖ for none; {smoothing_label(window)})", fontsize=10
    )
    for ax in (ax_eps, ax_grad):
        ax.legend(loc="upper left", fontsize=8, ncol=2, framealpha=0.9)
        ax.grid(alpha=0.3)


# ------------------------------------------------------------------------- io
def render_markdown(meta: dict, table: dict, b_limit: float, plots: dict[str, str]) -> str:
    lines = [
        "# Does CGGM balance? Synthetic imbalance benchmark",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"- status: **{'complete' if meta['complete'] else 'PARTIAL (still running or interrupted)'}**, "
        f"{meta['runs_done']}/{meta['runs_total']} runs, wall time {meta['wall_s']:.1f} s",
        f"- seeds {meta['seeds']}, epochs {meta['epochs']}, train/held-out size "
        f"{meta['train_size']}/{meta['val_size']}, torch {meta['torch']} with {meta['threads']} thread(s), "
        f"git {meta['git']}, {meta['started']}",
        "- Fused and probe metrics are on the held-out split: accuracy in % (higher is better) "
        "or MAE (lower is better); mean ± std over the runs that stayed finite (— if none).",
        "- *diverged*: runs with a non-finite fused/probe metric or telemetry value. "
        f"*|B|>limit*: runs where some |B_i| exceeded {b_limit:g}. *first bad step*: median (min–max) "
        "over the runs that had one, of the first step with a non-finite value or such a |B|. "
        "*max |B|*: over all finite B of all runs. *collapsed*: finite runs in which every encoder's "
        "gradient is exactly zero over the last eighth of training (dead ReLUs; the model predicts a "
        "constant); they count in the means.",
        "- *step ms*: `train_and_evaluate`'s mean optimizer-step time, mean over seeds. *× none*: "
        "step-time ratio to `none` of the same task and seed, measured in this run (methods interleaved "
        "within each seed); each run's time is its fastest epoch (wall clock / steps, so bursts of load "
        "from other processes drop out); median (min–max) over seeds.",
        "",
    ]
    for task, task_table in table.items():
        spec = TASKS[task]
        lines += [f"## {task} ({spec.kind}; modalities {', '.join(task_table['modalities'])})", ""]
        lines += [markdown_table(*table_rows(task_table)).rstrip(), ""]
        notes = divergence_notes(task_table, b_limit)
        if notes:
            lines += ["Divergence:", "", *notes, ""]
        header, rows = telemetry_rows(task_table)
        if rows:
            lines += [
                "Telemetry (mean over seeds of per-run medians; *plateau*: first step where the "
                "smoothed batch metric of the lead head made 90% of its rise; *eps*: the heads' batch "
                "metric; steps before divergence only, and no phases for runs that diverged in the "
                "first half):",
                "",
                markdown_table(header, rows).rstrip(),
                "",
            ]
        if task in plots:
            lines += [f"![{task} telemetry]({plots[task]})", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    plan = []
    for seed in seeds:  # seed-major; method order rotated per seed, as in every comparison
        for task in args.tasks:
            plan += [(seed, task, method) for method in rotated(args.methods, seed)]
    meta = _meta(args, seeds, len(plan))
    results: list[dict] = []
    plot_telemetry: dict[str, dict[str, list[dict]]] = {task: {} for task in args.tasks}
    began = time.perf_counter()

    def save(complete: bool) -> dict:
        meta.update({"complete": complete, "runs_done": len(results), "wall_s": time.perf_counter() - began})
        table = aggregate(results, args.tasks, args.methods)
        payload = {"meta": meta, "table": table, "runs": results}
        atomic_write_text(out / "results.json", json.dumps(json_safe(payload), indent=1, allow_nan=False) + "\n")
        return table

    steps_per_run = args.epochs
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs,"),
        TextColumn("runs {task.fields[runs]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False,
    ) as progress:
        bar = progress.add_task("warm-up", total=len(plan) * steps_per_run, runs=f"0/{len(plan)}")
        warm_up(args.tasks, args.methods)
        for number, (seed, task, method) in enumerate(plan, 1):
            progress.update(bar, description=f"{task} {method} seed {seed}")
            config = RunConfig(
                task=task, seed=seed, epochs=args.epochs, train_size=args.train_size,
                val_size=args.val_size, balancer=method_spec(method),
            )
            done_before = progress.tasks[0].completed
            result, telemetry = run_recorded(config, method, args.b_limit, lambda: progress.advance(bar))
            if "error" in result:
                progress.console.print(f"[red]{task} {method} seed {seed}: ERROR {result['error']}")
            progress.update(bar, completed=done_before + steps_per_run, runs=f"{number}/{len(plan)}")
            results.append(result)
            if telemetry is not None and seed == seeds[0]:
                plot_telemetry[task][method] = telemetry
            if "error" not in result:
                progress.console.print(run_line(result, TASKS[task].kind))
            save(complete=False)

    table = save(complete=True)
    plots: dict[str, str] = {}
    if not args.no_plots:
        for task in args.tasks:
            name = f"{task}_telemetry.png"
            if plot_task(task, plot_telemetry[task], seeds[0], args.epochs, out / name, BalancerSpec.rho, args.b_limit):
                plots[task] = name
    meta["plots"] = {task: str(out / name) for task, name in plots.items()}
    table = save(complete=True)
    atomic_write_text(out / "results.md", render_markdown(meta, table, args.b_limit, plots) + "\n")

    print_summary(console, table, args.b_limit)
    console.print(f"\nwall time {meta['wall_s']:.1f} s; wrote {out / 'results.json'}, {out / 'results.md'}"
                  + "".join(f", {out / name}" for name in plots.values()))
    errors = sum("error" in r for r in results)
    if errors:
        console.print(f"[red]{errors} run(s) raised; see 'error' in results.json")
    return 1 if errors else 0


def _meta(args: argparse.Namespace, seeds: list[int], runs: int) -> dict:
    """The run's settings and provenance, at the top of results.json and results.md."""
    origin = provenance("numpy")
    return {
        "command": origin["command"], "started": origin["date"], "tasks": args.tasks, "methods": args.methods,
        "seeds": seeds, "epochs": args.epochs, "train_size": args.train_size, "val_size": args.val_size,
        "threads": args.threads, "b_limit": args.b_limit, "rho": BalancerSpec.rho, "lam": BalancerSpec.lam,
        "torch": origin["versions"]["torch"], "python": origin["versions"]["python"],
        "machine": origin["machine"], "git": origin["git"], "runs_total": runs,
    }


def run_recorded(config: RunConfig, method: str, b_limit: float, progress: Callable[[], None]) -> tuple[dict, list | None]:
    """:func:`run_one`, or the error it raised recorded as the run's result (the other runs go on)."""
    try:
        return run_one(config, b_limit, progress=progress)
    except Exception as error:
        return {"task": config.task, "seed": config.seed, "method": method, "config": config.to_dict(),
                "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}, None


def print_summary(console: Console, table: dict, b_limit: float) -> None:
    for task, task_table in table.items():
        console.print()
        console.print(rich_table(f"{task} ({TASKS[task].kind})", *table_rows(task_table)))
        for note in divergence_notes(task_table, b_limit):
            console.print("  " + note.replace("**", ""))


def run_line(result: dict, kind: str) -> str:
    summary = result["telemetry_summary"]
    fused = result["fused"]
    metric = (f"acc {100 * fused:.1f}%" if kind == "classification" else f"MAE {fused:.3f}") if _finite(fused) else "metric non-finite"
    text = f"{result['task']:5s} {result['method']:14s} seed {result['seed']}: {metric}, {result['step_ms']:.2f} ms/step"
    if result["diverged"]:
        text = f"[red]{text}, DIVERGED (first non-finite step {summary['first_nonfinite_step']})"
    if summary.get("first_B_blowup_step") is not None:
        text += f", |B| blow-up at step {summary['first_B_blowup_step']}, max |B| {summary['max_abs_B']:.3g}"
    return text


if __name__ == "__main__":
    sys.exit(main())
