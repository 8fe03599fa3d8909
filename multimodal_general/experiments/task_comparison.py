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

import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from multimodal_general.datasets.metrics import LOWER_IS_BETTER, SELECTION, TASK_METRICS
from multimodal_general.datasets.task_data import TaskData
from multimodal_general.errors import ConfigurationError
from multimodal_general.experiments.harness import (
    Column,
    errorbar_panels,
    markdown_table,
    method_cells,
    summarize,
    sweep,
    write_results,
)
from multimodal_general.experiments.imbalance_comparison import parse_methods
from multimodal_general.io import pin_settings
from multimodal_general.training.runner import TrainSettings, train_seed


def compare_on_task(
    settings: TrainSettings,
    data: TaskData,
    methods: str | Sequence[str],
    seeds: int,
    out: Path,
    progress: Callable[[str, int], None] | None = None,
) -> list[dict]:
    """Run (or resume) every method x seed through the harness; write and return the rows.

    ``progress(label, epochs_done)`` is called after every epoch, for a progress bar of
    ``len(methods) * seeds * settings.epochs`` epochs.
    """
    names = parse_methods(methods)
    if seeds < 1:
        raise ConfigurationError("--seeds must be >= 1")
    out = Path(out)
    shared = {k: v for k, v in settings.to_dict().items() if k not in ("balancer", "preset")}
    pin_settings(out / "settings.yaml", shared)

    def run(name: str, seed: int, tick: Callable[[], None]) -> dict:
        return train_seed(replace(settings, balancer=settings.balancer.with_method(name)), data, seed,
                          out / "runs" / name / f"seed-{seed}", resume=True, on_epoch=lambda epoch, row: tick())

    done = sweep(names, seeds, run, settings.epochs, progress)
    for name in done.not_applicable:
        shutil.rmtree(out / "runs" / name, ignore_errors=True)  # nothing of it is a result
    columns = _columns(data)
    done.rows = summarize(done, columns, diverged=lambda name, runs: sum(bool(r.get("diverged")) for r in runs))
    metric, _ = SELECTION[data.task]
    write_results(out, _header(settings, names, seeds, data) + _markdown(done.rows, columns), done.rows,
                  lambda path: errorbar_panels(path, done.rows, [
                      (f"{data.task}: fused test {metric} (mean ± std)", [("fused", f"test_{metric}")]),
                      (f"each modality's unimodal head (test {metric})", [(m, f"head_{m}") for m in data.modalities]),
                  ]))
    return done.rows


def _columns(data: TaskData) -> list[Column]:
    metric, _ = SELECTION[data.task]
    return [
        *(Column(f"test_{key}", f"{key} {'↓' if key in LOWER_IS_BETTER else '↑'}",
                 lambda r, key=key: r["test"]["fused"].get(key, math.nan)) for key in TASK_METRICS[data.task]),
        *(Column(f"head_{m}", f"head {m} ({metric})", lambda r, m=m: r["test"]["heads"].get(m, {}).get(metric, math.nan))
          for m in data.modalities),
        Column("selected_epoch", "selected epoch",
               lambda r: math.nan if r["selected_epoch"] is None else r["selected_epoch"], digits=1),
        Column("train_seconds", "train s/run", lambda r: r.get("train_seconds", math.nan), digits=1),
    ]


def _header(settings: TrainSettings, names: list[str], seeds: int, data: TaskData) -> str:
    metric, larger = SELECTION[data.task]
    sizes = ", ".join(f"{n} {len(s)}" for n, s in data.splits.items())
    return (
        f"# Comparison on `{data.task}` ({settings.data})\n\n"
        f"Command: `multimodal-general compare --task {data.task} --data {settings.data} "
        f"--methods {','.join(names)} --seeds {seeds} --epochs {settings.epochs} --lr {settings.lr} "
        f"--batch-size {settings.batch_size} --optimizer {settings.optimizer} --d-model {settings.d_model} "
        f"--layers {settings.layers}"
        + "".join(f" --balancer-option {k}={v}" for k, v in settings.balancer.options.items()) + "`\n\n"
        f"Splits: {sizes}. Same budget for every method: {settings.epochs} epochs, batch {settings.batch_size}, "
        f"{settings.optimizer} lr {settings.lr}, the same initialization seed and batch order per seed "
        f"(seeds 0..{seeds - 1}). Each run keeps the epoch with the best validation {metric} "
        f"({'max' if larger else 'min'}); the table is on test, never used for selection. Head: the "
        f"method's unimodal head on test ({metric}). Mean ± std over the seeds that did not diverge "
        "(diverged: no epoch with a finite validation metric).\n\n"
    )


def _markdown(rows: list[dict], columns: list[Column]) -> str:
    scores, timing = columns[:-2], columns[-2:]
    header = ["method", *(c.title for c in scores), "diverged", *(c.title for c in timing)]
    cells = []
    for row in rows:
        values = [c.cell(row) for c in scores] + [f"{row['diverged']}/{row['runs']}"]
        values += [c.mean_cell(row) for c in timing]
        cells.append(method_cells(row, values, len(header)))
    return markdown_table(header, cells)
