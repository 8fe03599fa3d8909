"""Several seeds of one configuration: the run folder, the summary (mean ± std) and the
evaluation of a finished run.

``RUN/config.yaml`` (the settings, written first), ``RUN/seed-<k>/`` (one
:func:`~multimodal_general.training.runner.train_seed` folder per seed), ``RUN/summary.json`` and
``RUN/summary.md`` (test metrics of the validation-selected models, mean ± std over seeds,
with each modality's unimodal head).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from multimodal_general.datasets.metrics import LOWER_IS_BETTER, SELECTION, TASK_METRICS
from multimodal_general.datasets.task_data import TaskData
from multimodal_general.errors import BadDataFile, ConfigurationError
from multimodal_general.io import atomic_write_text, json_safe
from multimodal_general.resume import check_resume, differences
from multimodal_general.runs.series import mean_std, plus_minus
from multimodal_general.training.runner import (
    TrainSettings,
    build,
    read_checkpoint,
    score,
    train_seed,
)

CONFIG = "config.yaml"


def seed_dir(run_dir: Path, seed: int) -> Path:
    return Path(run_dir) / f"seed-{seed}"


def read_settings(run_dir: Path) -> tuple[TrainSettings, list[int]]:
    """The settings and seeds of the run in ``run_dir`` (one-line error when it is none)."""
    path = Path(run_dir) / CONFIG
    try:
        saved = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise BadDataFile(path, "missing: not a multimodal-general run folder") from None
    except (OSError, yaml.YAMLError) as error:
        raise BadDataFile(path, f"cannot read ({type(error).__name__})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
        raise BadDataFile(path, "not a run configuration")
    return TrainSettings.from_dict(saved["settings"], str(path)), list(saved.get("seeds", [0]))


def train_run(
    settings: TrainSettings,
    data: TaskData,
    seeds: Sequence[int],
    run_dir: Path,
    resume: bool = False,
    on_seed: Callable[[int], None] | None = None,
    **callbacks,
) -> dict[str, Any]:
    """Train every seed (resuming finished/unfinished ones with ``resume``) and write the summary."""
    run_dir = Path(run_dir)
    config = run_dir / CONFIG
    fresh = not config.exists()
    if not fresh:
        saved, saved_seeds = read_settings(run_dir)
        if not resume:
            raise ConfigurationError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
        check_resume(differences({**saved.to_dict(), "seeds": saved_seeds}, {**settings.to_dict(), "seeds": list(seeds)}),
                     "epochs", config)
    folder_existed = run_dir.exists()
    atomic_write_text(config, yaml.safe_dump({"settings": settings.to_dict(), "seeds": list(seeds),
                                              "data": data.summary()}, sort_keys=False))
    results = []
    try:
        for seed in seeds:
            if on_seed is not None:
                on_seed(seed)
            results.append(train_seed(settings, data, seed, seed_dir(run_dir, seed), resume=resume, **callbacks))
    except ConfigurationError:
        if fresh and not any(run_dir.glob("seed-*/checkpoints/last.pt")):
            _remove_new_run(run_dir, folder_existed, seeds)  # e.g. a balancer that refuses the task
        raise
    return write_summary(run_dir, settings, results)


def _remove_new_run(run_dir: Path, folder_existed: bool, seeds: Sequence[int]) -> None:
    """Undo a run that failed before its first checkpoint: nothing of it is worth keeping, and
    a leftover ``config.yaml`` would make the next attempt ask for ``--resume``."""
    if not folder_existed:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    (run_dir / CONFIG).unlink(missing_ok=True)
    for seed in seeds:
        shutil.rmtree(seed_dir(run_dir, seed), ignore_errors=True)


def evaluate_run(run_dir: Path, data: TaskData, split: str = "test", checkpoint: str = "best",
                 settings: TrainSettings | None = None) -> dict[str, Any]:
    """Score every seed's ``best`` (or ``last``) checkpoint on ``split``; writes and returns
    ``RUN/evaluation-<split>-<checkpoint>.json``. ``settings`` default to the run's own."""
    if checkpoint not in ("best", "last"):
        raise ConfigurationError(f"--checkpoint must be best or last, not {checkpoint!r}")
    if split not in data.splits:
        raise ConfigurationError(f"unknown split {split!r}; choose from {list(data.splits)}")
    saved, seeds = read_settings(run_dir)
    settings = settings or saved
    per_seed = []
    for seed in seeds:
        path = seed_dir(run_dir, seed) / "checkpoints" / f"{checkpoint}.pt"
        payload = read_checkpoint(path)
        parts = build(settings, data, seed)
        try:
            parts.model.load_state_dict(payload["model"])
            parts.balancer.load_state_dict(payload["balancer"])
        except RuntimeError:
            raise BadDataFile(path, "does not match this data (other modalities or feature sizes)") from None
        per_seed.append({"seed": seed, "epoch": payload["epoch"], split: score(parts, data, split)})
    result = {"split": split, "checkpoint": checkpoint, "runs": per_seed,
              "summary": _aggregate([r[split] for r in per_seed], data.task)}
    atomic_write_text(Path(run_dir) / f"evaluation-{split}-{checkpoint}.json",
                      json.dumps(json_safe(result), indent=2) + "\n")
    return result


def _aggregate(scores: list[dict], task: str) -> dict[str, Any]:
    """``{"fused": {metric: [mean, std]}, "heads": {m: {metric: [mean, std]}}}``."""
    def table(rows: list[dict]) -> dict[str, list[float]]:
        return {k: list(mean_std([r.get(k, math.nan) for r in rows])) for k in TASK_METRICS[task]}

    heads = list(dict.fromkeys(m for s in scores for m in s["heads"]))
    return {"fused": table([s["fused"] for s in scores]),
            "heads": {m: table([s["heads"].get(m, {}) for s in scores]) for m in heads}}


def write_summary(run_dir: Path, settings: TrainSettings, results: list[dict]) -> dict[str, Any]:
    task = settings.task
    summary = {"method": settings.balancer.method, "task": task, "seeds": [r["seed"] for r in results],
               "selected_epochs": [r["selected_epoch"] for r in results],
               "diverged": sum(bool(r.get("diverged")) for r in results),
               "test": _aggregate([r["test"] for r in results], task),
               "valid": _aggregate([r["valid"] for r in results], task)}
    atomic_write_text(Path(run_dir) / "summary.json", json.dumps(json_safe(summary), indent=2) + "\n")
    atomic_write_text(Path(run_dir) / "summary.md", summary_markdown(summary))
    return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as Markdown: fused test metrics, then each modality's head."""
    task, test = summary["task"], summary["test"]
    metrics = TASK_METRICS[task]
    arrows = {m: "↓" if m in LOWER_IS_BETTER else "↑" for m in metrics}
    selection, larger = SELECTION[task]
    lines = [
        f"# {task}: {summary['method']}, seeds {summary['seeds']}", "",
        f"Test metrics of the model selected on validation {selection} ({'max' if larger else 'min'}); "
        f"selected epochs {summary['selected_epochs']}. Mean ± std over the seeds that did not "
        f"diverge ({summary['diverged']} diverged).", "",
        "| model | " + " | ".join(f"{m} {arrows[m]}" for m in metrics) + " |",
        "|---|" + "---|" * len(metrics),
        "| fused | " + " | ".join(plus_minus(test["fused"][m]) for m in metrics) + " |",
    ]
    for modality, values in test["heads"].items():
        lines.append(f"| head: {modality} | " + " | ".join(plus_minus(values[m]) for m in metrics) + " |")
    return "\n".join(lines) + "\n"
