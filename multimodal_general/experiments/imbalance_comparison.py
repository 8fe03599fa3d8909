"""The comparison harness: every method x seed on one synthetic imbalance task, same budget.

>>> compare("cls2", ["none", "cggm", "ogm_ge"], seeds=3, out="bench/results/compare_cls2", epochs=20)

Protocol (the same for every method):

* **Data.** For seed ``s``: train split ``generate(task, train_size, seed=2s)``, validation
  split ``generate(task, val_size, seed=2s+1)`` (exactly the splits of
  :func:`~multimodal_general.training.imbalance.train_and_evaluate`), and a **test** split
  ``generate(task, test_size, seed=TEST_SEED_OFFSET + s)``: the same task world (same
  prototypes and projections), samples drawn with a seed no train/validation split uses.
* **Budget.** Same epochs, batch size, learning rate, optimizer (SGD, momentum 0.9, weight
  decay 1e-4), initialization seed and batch order for every method.
* **Selection.** After every epoch the fused metric is measured on validation; the run
  keeps the epoch with the best validation metric (accuracy up, MAE down; first best wins).
  The test split is evaluated once, on the selected model. Nothing is selected on test.
* **Reported on test.** The fused metric; per modality a linear probe on the frozen encoder
  features (fit on train, scored on test) and the balancer's unimodal head (trained during
  the run by every method on detached features, except MMPareto which trains its heads
  on the encoders too).
* **Diverged.** A run diverges when a validation metric, a telemetry value or a selected
  test metric is not finite. Diverged runs are counted (``k/n``); means and stds are over
  the runs with a finite test metric.
* **Method-specific wiring.** With ``fusion_head="auto"`` (default) ``ogm_ge`` gets a
  single linear fused head (it needs ``W [h_1; h_2]``) and the others the two-layer head:
  pass ``fusion_head="linear"`` for a same-architecture comparison. ``modality_dropout`` drops
  features before the fused head in training steps. ``mslr`` runs its adaptive variant:
  after each epoch its scales are updated from each modality's unimodal-head validation
  metric (with SGD + weight decay its scale is close to, not exactly, a learning rate).
  ``gblending`` measures the fused and unimodal heads' losses on the whole train and
  validation splits before training and after every ``super_epoch``-th epoch, and re-estimates
  its loss weights from each pair of consecutive measurements (``update_from_losses``).
* **Not applicable.** A method whose build or first step raises a ``ConfigurationError``
  (e.g. ``agm`` or ``ogm_ge`` on ``reg2``) is reported as ``not applicable: <reason>``.

Outputs in ``out``: ``runs/<method>-seed<k>.json`` per finished run, with the balancer's
per-step telemetry beside it in ``runs/<method>-seed<k>.telemetry.csv`` (written atomically; a
rerun skips the pairs whose file exists and was made with the same settings; a file made
with different settings is an error, not silently reused), ``results.md``, ``results.csv``
and ``results.png``.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from multimodal_general.balance import BALANCERS, PRESETS, Validation
from multimodal_general.errors import ConfigurationError
from multimodal_general.io import atomic_write, atomic_write_text, json_safe
from multimodal_general.series import mean_std, plus_minus
from multimodal_general.training.imbalance import (
    FUSION_HEADS,
    TASKS,
    RunConfig,
    evaluate,
    fusion_head_of,
    generate,
    train_model,
)

TEST_SEED_OFFSET = 1_000_003
DEFAULT_METHODS = ("none", "cggm", "ogm_ge", "mmpareto", "agm", "mslr", "modality_dropout", "gblending")
RUN_FORMAT = 1


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """Method names from a comma-separated string or a list; unknown or repeated names are
    a :class:`ConfigurationError` (one line)."""
    names = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    if not names:
        raise ConfigurationError("no method given")
    for name in names:
        method_options(name)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigurationError(f"methods repeated: {repeated}")
    return names


def method_options(method: str) -> dict:
    """``<balancer>`` (any of BALANCERS) or ``cggm-<preset>`` -> RunConfig fields."""
    if method in BALANCERS:
        return {"balancer": method}
    balancer, _, preset = method.partition("-")
    if balancer == "cggm" and preset in PRESETS:
        return {"balancer": "cggm", "preset": preset}
    raise ConfigurationError(
        f"unknown method {method!r}; choose from {', '.join(BALANCERS)} or "
        + ", ".join(f"cggm-{p}" for p in PRESETS)
    )


@dataclass
class Outcome:
    """What :func:`compare` did: ``computed`` / ``skipped`` (method, seed) pairs, the
    not-applicable methods with their reasons, and the aggregated rows."""

    out: Path
    computed: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, int]] = field(default_factory=list)
    not_applicable: dict[str, str] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _higher_is_better(kind: str) -> bool:
    return kind == "classification"


def _metric_name(kind: str) -> str:
    return "accuracy" if kind == "classification" else "MAE"


@torch.no_grad()
def _fused_metric(model, split, kind: str) -> float:
    model.eval()
    output, _ = model(split.inputs)
    if not torch.isfinite(output).all():
        return math.nan
    if kind == "classification":
        return float((output.argmax(1) == split.target).float().mean())
    return float((output - split.target).abs().mean())


@torch.no_grad()
def _head_metrics(model, balancer, split, kind: str) -> dict[str, float]:
    model.eval()
    _, features = model(split.inputs)
    result = {}
    for name, head in balancer.heads.items():
        prediction = head(features[name])
        if not torch.isfinite(prediction).all():
            result[name] = math.nan
        elif kind == "classification":
            result[name] = float((prediction.argmax(1) == split.target).float().mean())
        else:
            result[name] = float((prediction - split.target).abs().mean())
    return result


@torch.no_grad()
def head_losses(model, balancer, split) -> dict[str, float]:
    """The task loss of the fused output (``"fused"``) and of every unimodal head on
    ``split`` (eval mode, whole split at once); NaN where a prediction is not finite."""
    model.eval()
    output, features = model(split.inputs)
    predictions = {"fused": output, **{name: head(features[name]) for name, head in balancer.heads.items()}}
    return {
        key: float(balancer.criterion(p, split.target)) if torch.isfinite(p).all() else math.nan
        for key, p in predictions.items()
    }


def run_one(config: RunConfig, test_size: int, progress: Callable[[], None] | None = None) -> tuple[dict, list[dict]]:
    """One run: train, select on validation after each epoch, evaluate the selected model on
    test. Returns the result and the balancer's per-step telemetry rows. Raises
    :class:`ConfigurationError` when the method cannot serve the task."""
    task = TASKS[config.task]
    kind = task.kind
    train = generate(task, config.train_size, seed=2 * config.seed)
    val = generate(task, config.val_size, seed=2 * config.seed + 1)
    test = generate(task, test_size, seed=TEST_SEED_OFFSET + config.seed)
    better = (lambda a, b: a > b) if _higher_is_better(kind) else (lambda a, b: a < b)
    best: dict = {"metric": math.nan, "epoch": None, "model": None, "balancer": None}
    curve: list[float] = []

    def on_epoch(epoch, model, balancer):
        metric = _fused_metric(model, val, kind)
        curve.append(metric)
        if _finite(metric) and (best["epoch"] is None or better(metric, best["metric"])):
            best.update(metric=metric, epoch=epoch, model=copy.deepcopy(model.state_dict()),
                        balancer=copy.deepcopy(balancer.state_dict()))
        model.train()

    def validation(epoch, model, balancer):
        """What MSLR (each head's validation metric, higher is better) and G-Blending (each
        head's train and validation loss) adapt from; measured only when one reads it."""
        sign = 1.0 if _higher_is_better(kind) else -1.0

        def losses():
            on_train, on_val = head_losses(model, balancer, train), head_losses(model, balancer, val)
            return {k: (on_train[k], on_val[k]) for k in on_train}

        return Validation(epoch, lambda: {n: sign * v for n, v in _head_metrics(model, balancer, val, kind).items()},
                          losses)

    began = time.perf_counter()
    model, balancer, telemetry, step_seconds = train_model(
        config, train, progress=progress, on_epoch=on_epoch, validation=validation
    )
    nonfinite_telemetry = sum(
        1 for row in telemetry if any(not _finite(v) for v in row.as_dict().values())
    )
    if best["epoch"] is not None:
        model.load_state_dict(best["model"])
        balancer.load_state_dict(best["balancer"])
    result = evaluate(model, task, train, test)
    fused_key = "fused_acc" if kind == "classification" else "fused_mae"
    test_metric = result[fused_key]
    if not _finite(test_metric):
        test_metric = math.nan
    heads = _head_metrics(model, balancer, test, kind)
    wall = time.perf_counter() - began
    diverged = (
        nonfinite_telemetry > 0
        or any(not _finite(v) for v in curve)
        or not _finite(test_metric)
        or any(not _finite(v) for v in result["probe"].values())
    )
    return {
        "test_metric": test_metric,
        "val_metric": best["metric"],
        "best_epoch": best["epoch"],
        "val_curve": curve,
        "probe": result["probe"],
        "head": heads,
        "diverged": diverged,
        "nonfinite_telemetry_steps": nonfinite_telemetry,
        "steps": len(telemetry),
        "step_ms": 1000 * step_seconds / max(len(telemetry), 1),
        "wall_s": wall,
    }, [row.as_dict() for row in telemetry]


def _settings(config: RunConfig, test_size: int) -> dict:
    settings = asdict(config)
    settings["test_size"] = test_size
    settings["fusion_head_used"] = fusion_head_of(config)
    settings["test_seed"] = TEST_SEED_OFFSET + config.seed
    settings["format"] = RUN_FORMAT
    return settings


def _telemetry_csv(rows: list[dict]) -> str:
    """One row per optimizer step (``step``, ``eps/<m>``, ``B/<m>``, ``grad_norm/<m>``, ...)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _dump(payload: dict) -> str:
    return json.dumps(json_safe(payload), indent=2) + "\n"  # NaN as null: strict JSON


def _load(x):
    if x is None:
        return math.nan
    if isinstance(x, dict):
        return {k: _load(v) for k, v in x.items()}
    return x


def compare(
    task: str,
    methods: str | Sequence[str],
    seeds: int,
    out: str | Path,
    epochs: int = RunConfig.epochs,
    *,
    train_size: int = RunConfig.train_size,
    val_size: int = RunConfig.val_size,
    test_size: int | None = None,
    batch_size: int = RunConfig.batch_size,
    lr: float = RunConfig.lr,
    fusion_head: str = "auto",
    balancer_options: dict | None = None,
    progress: Callable[[str, int], None] | None = None,
    plot: bool = True,
) -> Outcome:
    """Run (or resume) the comparison and write the per-run files and the tables.

    ``progress(label, epochs_done)`` is called after every epoch (and with a whole run's or
    method's epochs when it is skipped), for a progress bar of
    ``len(methods) * seeds * epochs`` epochs. ``test_size`` defaults to ``val_size``.
    ``balancer_options`` (e.g. ``{"alpha": 0.5}``) go to every method that declares them.
    """
    if task not in TASKS:
        raise ConfigurationError(f"unknown task {task!r}; choose from {list(TASKS)}")
    names = parse_methods(methods)
    if seeds < 1 or epochs < 1 or train_size < batch_size or val_size < 1 or batch_size < 1:
        raise ConfigurationError(
            "need seeds >= 1, epochs >= 1, batch_size >= 1, train_size >= batch_size and val_size >= 1"
        )
    if fusion_head not in ("auto", *FUSION_HEADS):
        raise ConfigurationError(f"unknown fusion head {fusion_head!r}; choose from {['auto', *FUSION_HEADS]}")
    test_size = val_size if test_size is None else test_size
    if test_size < 1:
        raise ConfigurationError("test_size must be >= 1")
    out = Path(out)
    runs_dir = out / "runs"
    outcome = Outcome(out)
    base = RunConfig(task=task, epochs=epochs, train_size=train_size, val_size=val_size,
                     batch_size=batch_size, lr=lr, fusion_head=fusion_head,
                     balancer_options=dict(balancer_options or {}))
    results: dict[str, list[dict]] = {name: [] for name in names}
    report = progress or (lambda label, n: None)

    # seed-major: all methods of one seed back to back (order rotated per seed, so no method
    # always pays the first run's warm-up), so wall times compare like with like
    for seed in range(seeds):
        shift = seed % len(names)
        for name in names[shift:] + names[:shift]:
            if name in outcome.not_applicable:
                report(f"{name} seed {seed} (not applicable)", epochs)
                continue
            config = replace(base, seed=seed, **method_options(name))
            settings = _settings(config, test_size)
            path = runs_dir / f"{name}-seed{seed}.json"
            if path.exists():
                try:
                    saved = json.loads(path.read_text())
                except (OSError, ValueError):
                    saved = None  # unreadable (should not happen with atomic writes): recompute
                if saved is not None:
                    if saved.get("settings") != settings:
                        raise ConfigurationError(
                            f"{path} was made with other settings than this comparison's; use another "
                            "--out or delete that folder"
                        )
                    results[name].append(_load(saved["result"]))
                    outcome.skipped.append((name, seed))
                    report(f"{name} seed {seed} (done before)", epochs)
                    continue
            done = [0]

            def tick(label=f"{name} seed {seed}"):
                done[0] += 1
                report(label, 1)

            try:
                result, telemetry = run_one(config, test_size, progress=tick)
            except ConfigurationError as error:
                outcome.not_applicable[name] = str(error).strip().splitlines()[0]
                report(f"{name} (not applicable)", epochs - done[0])
                continue
            atomic_write_text(path.with_suffix(".telemetry.csv"), _telemetry_csv(telemetry))
            atomic_write_text(path, _dump({"method": name, "seed": seed, "settings": settings, "result": result}))
            results[name].append(result)
            outcome.computed.append((name, seed))

    task_spec = TASKS[task]
    modalities = [s.name for s in task_spec.modalities]
    outcome.rows = [
        _aggregate(name, results[name], outcome.not_applicable.get(name), modalities,
                   fusion_head_of(replace(base, **method_options(name))))
        for name in names
    ]
    header = _header(task, names, seeds, base, test_size)
    atomic_write_text(out / "results.md", _markdown(header, outcome.rows, modalities, task_spec.kind))
    atomic_write_text(out / "results.csv", _csv(outcome.rows, modalities))
    if plot:
        _plot(out / "results.png", outcome.rows, modalities, task, task_spec.kind)
    return outcome


def _aggregate(name: str, runs: list[dict], reason: str | None, modalities: list[str], head: str) -> dict:
    row: dict = {"method": name, "fusion_head": head, "status": "ok", "reason": "", "runs": len(runs)}
    if reason is not None:
        row.update(status="not applicable", reason=reason, runs=0)
        runs = []
    row["metric_mean"], row["metric_std"] = mean_std([r["test_metric"] for r in runs])
    row["finite"] = sum(_finite(r["test_metric"]) for r in runs)
    row["diverged"] = sum(bool(r["diverged"]) for r in runs)
    for m in modalities:
        row[f"probe_{m}_mean"], row[f"probe_{m}_std"] = mean_std([r["probe"].get(m, math.nan) for r in runs])
        row[f"head_{m}_mean"], row[f"head_{m}_std"] = mean_std([r["head"].get(m, math.nan) for r in runs])
    row["wall_s_mean"], row["wall_s_std"] = mean_std([r["wall_s"] for r in runs])
    row["wall_s_total"] = sum(r["wall_s"] for r in runs)
    row["best_epoch_mean"], _ = mean_std([r["best_epoch"] + 1 for r in runs if r["best_epoch"] is not None])
    return row


def _header(task: str, names: list[str], seeds: int, base: RunConfig, test_size: int) -> str:
    return (
        f"# Comparison on `{task}`\n\n"
        f"Command: `multimodal-general compare --task {task} --methods {','.join(names)} --seeds {seeds} "
        f"--epochs {base.epochs} --train-size {base.train_size} --val-size {base.val_size} "
        f"--test-size {test_size} --lr {base.lr} --fusion-head {base.fusion_head}"
        + "".join(f" --balancer-option {k}={v}" for k, v in base.balancer_options.items()) + "`\n\n"
        f"Same budget for every method: {base.epochs} epochs, batch {base.batch_size}, SGD lr {base.lr} "
        f"(momentum 0.9, weight decay 1e-4); seeds 0..{seeds - 1}. Each run keeps the epoch with the best "
        "validation fused metric; the table is on a separate test split of the same task world "
        f"(sample seed {TEST_SEED_OFFSET} + seed), never used for selection. Probe: linear probe on "
        "the frozen encoder features (fit on train, scored on test). Head: the method's unimodal "
        "head on test. Means ± std over the runs with a finite test metric; diverged = runs "
        "with any non-finite validation metric, telemetry value or test metric.\n\n"
    )


def _markdown(header: str, rows: list[dict], modalities: list[str], kind: str) -> str:
    arrow = "↑" if _higher_is_better(kind) else "↓"
    metric = _metric_name(kind)
    columns = ["method", f"test {metric} {arrow}", "diverged"]
    columns += [f"probe {m}" for m in modalities] + [f"head {m}" for m in modalities]
    columns += ["best epoch (mean)", "wall s/run", "fused head"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        if row["status"] != "ok":
            cells = [row["method"], f"not applicable: {row['reason']}"] + [""] * (len(columns) - 2)
        else:
            cells = [row["method"], plus_minus((row["metric_mean"], row["metric_std"])), f"{row['diverged']}/{row['runs']}"]
            cells += [plus_minus((row[f"probe_{m}_mean"], row[f"probe_{m}_std"])) for m in modalities]
            cells += [plus_minus((row[f"head_{m}_mean"], row[f"head_{m}_std"])) for m in modalities]
            cells += [
                "—" if not _finite(row["best_epoch_mean"]) else f"{row['best_epoch_mean']:.1f}",
                plus_minus((row["wall_s_mean"], row["wall_s_std"]), 1),
                row["fusion_head"],
            ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return header + "\n".join(lines) + "\n"


def _csv(rows: list[dict], modalities: list[str]) -> str:
    fields = ["method", "status", "reason", "runs", "finite", "diverged", "metric_mean", "metric_std"]
    for m in modalities:
        fields += [f"probe_{m}_mean", f"probe_{m}_std", f"head_{m}_mean", f"head_{m}_std"]
    fields += ["best_epoch_mean", "wall_s_mean", "wall_s_std", "wall_s_total", "fusion_head"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    return buffer.getvalue()


def _plot(path: Path, rows: list[dict], modalities: list[str], task: str, kind: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["method"] for r in rows]
    positions = range(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) + 4), 4.2))
    # points with error bars (not bars from 0), so that the axis zooms onto the differences
    shown = [i for i, r in enumerate(rows) if r["status"] == "ok" and _finite(r["metric_mean"])]
    axes[0].errorbar(shown, [rows[i]["metric_mean"] for i in shown],
                     yerr=[rows[i]["metric_std"] if _finite(rows[i]["metric_std"]) else 0.0 for i in shown],
                     fmt="o", capsize=4, color="tab:blue")
    for i, r in enumerate(rows):
        if i not in shown:
            axes[0].annotate("n/a", (i, 0.5), xycoords=("data", "axes fraction"), ha="center")
    axes[0].set_title(f"{task}: fused test {_metric_name(kind)} (mean ± std)")
    offset = 0.3 / max(len(modalities), 1)
    for j, m in enumerate(modalities):
        idx = [i for i in shown if _finite(rows[i][f"probe_{m}_mean"])]
        axes[1].errorbar([i + offset * (j - (len(modalities) - 1) / 2) for i in idx],
                         [rows[i][f"probe_{m}_mean"] for i in idx],
                         yerr=[rows[i][f"probe_{m}_std"] if _finite(rows[i][f"probe_{m}_std"]) else 0.0 for i in idx],
                         fmt="o", capsize=3, label=m)
    axes[1].set_title(f"linear probe per modality (test {_metric_name(kind)})")
    axes[1].legend()
    for ax in axes:
        ax.set_xticks(list(positions))
        ax.set_xticklabels(labels, rotation=30, ha="right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
