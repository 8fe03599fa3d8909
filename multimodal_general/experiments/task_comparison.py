"""The comparison harness on Food-101, CMU-MOSI and IEMOCAP data (real or synthetic): every
method x seed trained by :func:`~multimodal_general.training.runner.train_seed` with the same
settings, each run selected on ``valid``, scored once on ``test``.

>>> compare_on_task(settings, data, ["none", "cggm", "mslr"], seeds=3, out=Path("cmp"))

``OUT/runs/<method>/seed-<k>/`` is a full run folder (metrics, per-step telemetry of the
balancer, checkpoints, plots, ``test.json``); a rerun skips the runs whose ``test.json`` exists
and continues unfinished ones. ``OUT/settings.yaml`` pins the shared settings: a rerun with
other settings is refused. ``results.md`` / ``results.csv`` / ``results.png``: mean ± std of
the task's field metrics on test, each modality's unimodal head on test (by the selection
metric), the selected epoch and the training time per run. A method that cannot serve the
task (a :class:`ConfigurationError` when it is built or at its first step, e.g. OGM-GE or AGM
on the regression task MOSI) is a "not applicable" row.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from multimodal_general.datasets.metrics import LOWER_IS_BETTER, SELECTION, TASK_METRICS
from multimodal_general.datasets.task_data import TaskData
from multimodal_general.errors import ConfigurationError
from multimodal_general.experiments.imbalance_comparison import method_options, parse_methods
from multimodal_general.io import atomic_write, atomic_write_text, pin_settings
from multimodal_general.series import mean_std, plus_minus
from multimodal_general.training.runner import TrainSettings, train_seed


def compare_on_task(
    settings: TrainSettings,
    data: TaskData,
    methods: str | Sequence[str],
    seeds: int,
    out: Path,
    on_epoch: Callable[[str, int], None] | None = None,
) -> list[dict]:
    """Run (or resume) every method x seed; write and return the aggregated rows."""
    names = parse_methods(methods)
    if seeds < 1:
        raise ConfigurationError("--seeds must be >= 1")
    out = Path(out)
    shared = {k: v for k, v in asdict(settings).items() if k not in ("balancer", "preset")}
    pin_settings(out / "settings.yaml", shared)
    results: dict[str, list[dict]] = {n: [] for n in names}
    not_applicable: dict[str, str] = {}
    for seed in range(seeds):
        shift = seed % len(names)
        for name in names[shift:] + names[:shift]:  # no method always runs first
            run = replace(settings, **method_options(name))
            report = (lambda epoch, row, label=f"{name} seed {seed}": on_epoch(label, epoch)) if on_epoch else None
            if name not in not_applicable:
                try:
                    results[name].append(
                        train_seed(run, data, seed, out / "runs" / name / f"seed-{seed}", resume=True, on_epoch=report)
                    )
                except ConfigurationError as error:
                    if results[name]:
                        raise
                    not_applicable[name] = str(error).strip().splitlines()[0]
                    shutil.rmtree(out / "runs" / name, ignore_errors=True)  # nothing of it is a result
            if report is not None:  # every run counts all its epochs: finished before, or not applicable
                report(run.epochs, None)
    rows = [_row(name, results[name], not_applicable.get(name), data) for name in names]
    header = _header(settings, names, seeds, data)
    atomic_write_text(out / "results.md", header + _markdown(rows, data))
    atomic_write_text(out / "results.csv", _csv(rows))
    _plot(out / "results.png", rows, data)
    return rows


def _row(name: str, runs: list[dict], reason: str | None, data: TaskData) -> dict:
    metric, _ = SELECTION[data.task]
    row: dict = {"method": name, "status": "ok" if reason is None else "not applicable",
                 "reason": reason or "", "runs": len(runs)}
    for key in TASK_METRICS[data.task]:
        row[f"test_{key}"] = mean_std([r["test"]["fused"].get(key, math.nan) for r in runs])
    for m in data.modalities:
        row[f"head_{m}"] = mean_std([r["test"]["heads"].get(m, {}).get(metric, math.nan) for r in runs])
    row["diverged"] = sum(bool(r.get("diverged")) for r in runs)
    row["selected_epoch"] = mean_std([r["selected_epoch"] for r in runs if r["selected_epoch"] is not None])
    row["train_seconds"] = mean_std([r.get("train_seconds", math.nan) for r in runs])
    return row


def _header(settings: TrainSettings, names: list[str], seeds: int, data: TaskData) -> str:
    metric, larger = SELECTION[data.task]
    sizes = ", ".join(f"{n} {len(s)}" for n, s in data.splits.items())
    return (
        f"# Comparison on `{data.task}` ({settings.data})\n\n"
        f"Command: `multimodal-general compare --task {data.task} --data {settings.data} "
        f"--methods {','.join(names)} --seeds {seeds} --epochs {settings.epochs} --lr {settings.lr} "
        f"--batch-size {settings.batch_size} --optimizer {settings.optimizer} --d-model {settings.d_model} "
        f"--layers {settings.layers}"
        + "".join(f" --balancer-option {k}={v}" for k, v in settings.balancer_options.items()) + "`\n\n"
        f"Splits: {sizes}. Same budget for every method: {settings.epochs} epochs, batch {settings.batch_size}, "
        f"{settings.optimizer} lr {settings.lr}, the same initialization seed and batch order per seed "
        f"(seeds 0..{seeds - 1}). Each run keeps the epoch with the best validation {metric} "
        f"({'max' if larger else 'min'}); the table is on test, never used for selection. Head: the "
        f"method's unimodal head on test ({metric}). Mean ± std over the seeds that did not diverge "
        "(diverged: no epoch with a finite validation metric).\n\n"
    )


def _markdown(rows: list[dict], data: TaskData) -> str:
    metric, _ = SELECTION[data.task]
    keys = TASK_METRICS[data.task]
    columns = ["method"] + [f"{k} {'↓' if k in LOWER_IS_BETTER else '↑'}" for k in keys]
    columns += [f"head {m} ({metric})" for m in data.modalities] + ["diverged", "selected epoch", "train s/run"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        if row["status"] != "ok":
            cells = [row["method"], f"not applicable: {row['reason']}"] + [""] * (len(columns) - 2)
        else:
            cells = [row["method"]] + [plus_minus(list(row[f"test_{k}"])) for k in keys]
            cells += [plus_minus(list(row[f"head_{m}"])) for m in data.modalities]
            epoch, seconds = row["selected_epoch"], row["train_seconds"]
            cells += [f"{row['diverged']}/{row['runs']}", f"{epoch[0]:.1f}" if math.isfinite(epoch[0]) else "—",
                      f"{seconds[0]:.1f}" if math.isfinite(seconds[0]) else "—"]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    flat = []
    for row in rows:
        item = {}
        for key, value in row.items():
            if isinstance(value, tuple):
                item[f"{key}_mean"], item[f"{key}_std"] = ("" if not math.isfinite(v) else v for v in value)
            else:
                item[key] = value
        flat.append(item)
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in flat for k in r)), lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buffer.getvalue()


def _plot(path: Path, rows: list[dict], data: TaskData) -> None:
    from matplotlib.figure import Figure

    metric, _ = SELECTION[data.task]
    fig = Figure(figsize=(max(8, 1.4 * len(rows) + 4), 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    shown = [i for i, r in enumerate(rows) if r["status"] == "ok" and math.isfinite(r[f"test_{metric}"][0])]
    axes[0].errorbar(shown, [rows[i][f"test_{metric}"][0] for i in shown],
                     yerr=[rows[i][f"test_{metric}"][1] for i in shown], fmt="o", capsize=4)
    axes[0].set_title(f"{data.task}: fused test {metric} (mean ± std)", fontsize=10)
    for j, m in enumerate(data.modalities):
        offset = 0.25 * (j - (len(data.modalities) - 1) / 2) / max(len(data.modalities), 1)
        idx = [i for i in shown if math.isfinite(rows[i][f"head_{m}"][0])]
        axes[1].errorbar([i + offset for i in idx], [rows[i][f"head_{m}"][0] for i in idx],
                         yerr=[rows[i][f"head_{m}"][1] for i in idx], fmt="o", capsize=3, label=m)
    axes[1].set_title(f"each modality's unimodal head (test {metric})", fontsize=10)
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["method"] for r in rows], rotation=30, ha="right")
        ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
