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
from dataclasses import replace
from pathlib import Path

import torch

from multimodal_general.balance import METHODS, BalancerSpec, Validation
from multimodal_general.errors import ConfigurationError
from multimodal_general.experiments import harness
from multimodal_general.experiments.harness import (
    Column,
    Sweep,
    errorbar_panels,
    markdown_table,
    method_cells,
    summarize,
    sweep,
    write_results,
)
from multimodal_general.io import atomic_write_text, json_safe
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
    """Method labels (``"none,cggm"``, a list, or ``"all"`` = :data:`DEFAULT_METHODS`), each one
    of :data:`~multimodal_general.balance.METHODS`, checked."""
    return harness.parse_methods(methods, METHODS, DEFAULT_METHODS)


def method_spec(method: str, base: BalancerSpec | None = None) -> BalancerSpec:
    """The balancer of a method label (checked as :func:`parse_methods` checks it): ``base``
    (default: the defaults) with the balancer and CGGM preset the label names."""
    parse_methods([method])
    return (base or BalancerSpec()).with_method(method)


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
    settings = config.to_dict()
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
) -> Sweep:
    """Run (or resume) the comparison through the harness and write the per-run files and the
    tables; returns the :class:`~multimodal_general.experiments.harness.Sweep` with its rows.

    ``progress(label, epochs_done)`` is called after every epoch (and with a whole run's or
    method's epochs when it is skipped), for a progress bar of
    ``len(methods) * seeds * epochs`` epochs. ``test_size`` defaults to ``val_size``.
    ``balancer_options`` (e.g. ``{"alpha": 0.5}``) go to every method that declares them.
    """
    if task not in TASKS:
        raise ConfigurationError(f"unknown task {task!r}; choose from {list(TASKS)}")
    names = parse_methods(methods)
    test_size = val_size if test_size is None else test_size
    _check_sizes(seeds, epochs, train_size, val_size, test_size, batch_size, fusion_head)
    out = Path(out)
    base = RunConfig(task=task, epochs=epochs, train_size=train_size, val_size=val_size,
                     batch_size=batch_size, lr=lr, fusion_head=fusion_head,
                     balancer=BalancerSpec(options=dict(balancer_options or {})))

    def config_of(name: str, seed: int) -> RunConfig:
        return replace(base, seed=seed, balancer=method_spec(name, base.balancer))

    def path_of(name: str, seed: int) -> Path:
        return out / "runs" / f"{name}-seed{seed}.json"

    def run(name: str, seed: int, tick: Callable[[], None]) -> dict:
        config, path = config_of(name, seed), path_of(name, seed)
        result, telemetry = run_one(config, test_size, progress=tick)
        atomic_write_text(path.with_suffix(".telemetry.csv"), _telemetry_csv(telemetry))
        settings = _settings(config, test_size)
        atomic_write_text(path, _dump({"method": name, "seed": seed, "settings": settings, "result": result}))
        return result

    def reuse(name: str, seed: int) -> dict | None:
        return _saved_run(path_of(name, seed), _settings(config_of(name, seed), test_size))

    done = sweep(names, seeds, run, epochs, progress, reuse)
    _write_tables(done, out, base, names, seeds, test_size, plot)
    return done


def _check_sizes(seeds: int, epochs: int, train_size: int, val_size: int, test_size: int, batch_size: int,
                 fusion_head: str) -> None:
    if seeds < 1 or epochs < 1 or train_size < batch_size or val_size < 1 or batch_size < 1:
        raise ConfigurationError(
            "need seeds >= 1, epochs >= 1, batch_size >= 1, train_size >= batch_size and val_size >= 1"
        )
    if fusion_head not in ("auto", *FUSION_HEADS):
        raise ConfigurationError(f"unknown fusion head {fusion_head!r}; choose from {['auto', *FUSION_HEADS]}")
    if test_size < 1:
        raise ConfigurationError("test_size must be >= 1")


def _write_tables(done: Sweep, out: Path, base: RunConfig, names: list[str], seeds: int, test_size: int,
                  plot: bool) -> None:
    """Summarize the sweep's runs into its rows (``done.rows``) and write results.md, .csv
    and (with ``plot``) .png in ``out``."""
    task_spec = TASKS[base.task]
    modalities = [s.name for s in task_spec.modalities]
    columns = _columns(modalities)
    done.rows = summarize(
        done, columns,
        finite=lambda name, runs: sum(_finite(r["test_metric"]) for r in runs),
        diverged=lambda name, runs: sum(bool(r["diverged"]) for r in runs),
        wall_s_total=lambda name, runs: sum(r["wall_s"] for r in runs),
        fusion_head=lambda name, runs: fusion_head_of(replace(base, balancer=method_spec(name, base.balancer))),
    )
    markdown = _header(base.task, names, seeds, base, test_size) + _markdown(done.rows, columns, task_spec.kind)
    write_results(out, markdown, done.rows,
                  (lambda path: _plot(path, done.rows, modalities, base.task, task_spec.kind)) if plot else None)


def _saved_run(path: Path, settings: dict) -> dict | None:
    """The result of a run finished before with the same settings (None when there is none);
    one made with other settings is an error, not silently reused."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing, or unreadable (should not happen with atomic writes): recompute
    if saved.get("settings") != settings:
        raise ConfigurationError(
            f"{path} was made with other settings than this comparison's; use another --out or delete that folder"
        )
    return _load(saved["result"])


def _columns(modalities: list[str]) -> list[Column]:
    return [
        Column("metric", "test", lambda r: r["test_metric"]),
        *(Column(f"probe_{m}", f"probe {m}", lambda r, m=m: r["probe"].get(m, math.nan)) for m in modalities),
        *(Column(f"head_{m}", f"head {m}", lambda r, m=m: r["head"].get(m, math.nan)) for m in modalities),
        Column("best_epoch", "best epoch (mean)",
               lambda r: math.nan if r["best_epoch"] is None else r["best_epoch"] + 1, digits=1),
        Column("wall_s", "wall s/run", lambda r: r["wall_s"], digits=1),
    ]


def _header(task: str, names: list[str], seeds: int, base: RunConfig, test_size: int) -> str:
    return (
        f"# Comparison on `{task}`\n\n"
        f"Command: `multimodal-general compare --task {task} --methods {','.join(names)} --seeds {seeds} "
        f"--epochs {base.epochs} --train-size {base.train_size} --val-size {base.val_size} "
        f"--test-size {test_size} --lr {base.lr} --fusion-head {base.fusion_head}"
        + "".join(f" --balancer-option {k}={v}" for k, v in base.balancer.options.items()) + "`\n\n"
        f"Same budget for every method: {base.epochs} epochs, batch {base.batch_size}, SGD lr {base.lr} "
        f"(momentum 0.9, weight decay 1e-4); seeds 0..{seeds - 1}. Each run keeps the epoch with the best "
        "validation fused metric; the table is on a separate test split of the same task world "
        f"(sample seed {TEST_SEED_OFFSET} + seed), never used for selection. Probe: linear probe on "
        "the frozen encoder features (fit on train, scored on test). Head: the method's unimodal "
        "head on test. Means ± std over the runs with a finite test metric; diverged = runs "
        "with any non-finite validation metric, telemetry value or test metric.\n\n"
    )


def _markdown(rows: list[dict], columns: list[Column], kind: str) -> str:
    header = ["method", f"test {_metric_name(kind)} {'↑' if _higher_is_better(kind) else '↓'}", "diverged",
              *(c.title for c in columns[1:]), "fused head"]
    cells = []
    for row in rows:
        values = [columns[0].cell(row), f"{row['diverged']}/{row['runs']}", *(c.cell(row) for c in columns[1:-2])]
        values += [columns[-2].mean_cell(row), columns[-1].cell(row), row["fusion_head"]]
        cells.append(method_cells(row, values, len(header)))
    return markdown_table(header, cells)


def _plot(path: Path, rows: list[dict], modalities: list[str], task: str, kind: str) -> None:
    metric = _metric_name(kind)
    errorbar_panels(path, rows, [
        (f"{task}: fused test {metric} (mean ± std)", [("fused", "metric")]),
        (f"linear probe per modality (test {metric})", [(m, f"probe_{m}") for m in modalities]),
    ])
