"""Figures of a training run, drawn from the files :class:`~multimodal_general.runs.runlog.Logbook`
writes: ``metrics.jsonl`` (one JSON object per finished epoch) and ``telemetry.csv`` (one row per
optimizer step). Shared by the BraTS trainer and the general tasks: the training loss, and the
balance figure (each modality's auxiliary-head metric, CGGM's ``B`` and gradient cosines), each
drawn only when the files hold its data, so that it works on a run that is still training, on a
baseline without auxiliary heads and on a run whose telemetry is missing. Matplotlib ``Figure``
objects are used directly (Agg, no pyplot state); every PNG is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from multimodal_general.errors import BadDataFile
from multimodal_general.io import atomic_write
from multimodal_general.runs.series import moving_average, smoothing_label, smoothing_window

DPI = 110
WIDTH, ROW_HEIGHT = 10.0, 4.0
MODALITY_PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
                    "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
# (telemetry prefix, metrics prefix, y label, panel title)
BALANCE_PANELS = (
    ("eps/", "head_metric/", "head {metric} (training batch)", "auxiliary head {metric} per modality"),
    ("B/", "B/", "B (encoder gradient scale)", "CGGM magnitude coefficient B per modality"),
    ("cos/", "cos/", "cosine (fused vs. modality grad)", "CGGM gradient direction: cosine"),
    ("score/", "score/", "response score", "AGM / OGM-GE: each modality's own response, scored"),
    ("coef/", "coef/", "gradient coefficient", "AGM / OGM-GE: each encoder's gradient coefficient"),
    ("scale/", "scale/", "scale", "MSLR: learning-rate scale (MMPareto: magnitude factor)"),
    ("weight/", "weight/", "loss weight", "G-Blending: each unimodal loss's weight"),
)
#: panels whose value 1 means "gradient unchanged" (a dashed line there)
UNIT_PANELS = ("B/", "coef/", "scale/")
B_YLIM = (-1.0, 3.0)  # the B axis shows at most this range
TELEMETRY_PANEL_PREFIXES = tuple(spec[0] for spec in BALANCE_PANELS)
MODALITY_PREFIXES = ("eps/", "d/", "B/", "cos/", "grad_norm/", "score/", "coef/", "scale/", "weight/")


# ------------------------------------------------------------------------------- reading
def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl`` (``[]`` when the file is missing).

    Blank lines are skipped; a line that is not a JSON object raises :class:`BadDataFile`.
    """
    path = Path(run_dir) / "metrics.jsonl"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as error:
        raise BadDataFile(path, f"cannot read ({error})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise BadDataFile(path, f"line {number} is not JSON") from None
        if not isinstance(row, dict):
            raise BadDataFile(path, f"line {number} is not a JSON object")
        rows.append(row)
    return rows


def read_telemetry(run_dir: str | Path) -> dict[str, np.ndarray]:
    """The columns of ``run_dir/telemetry.csv`` as float arrays, in header order (``{}`` when
    the file is missing or empty).

    Empty or unparsable cells, and the cells a short (truncated) row lacks, become NaN.
    """
    path = Path(run_dir) / "telemetry.csv"
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            lines = [row for row in csv.reader(handle) if row]
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise BadDataFile(path, f"cannot read as CSV ({error})") from None
    if not lines:
        return {}
    header, body = lines[0], lines[1:]
    table = np.full((len(body), len(header)), np.nan)
    for i, row in enumerate(body):
        for j, cell in enumerate(row[: len(header)]):
            table[i, j] = to_float(cell)
    return {name: table[:, j].copy() for j, name in enumerate(header)}


def to_float(value: Any) -> float:
    """``value`` as a float; NaN for an empty cell, ``None`` or anything not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# ----------------------------------------------------------------------------- smoothing
def finite(values: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values), values, np.nan)


def has_data(values: np.ndarray | None) -> bool:
    return values is not None and bool(np.isfinite(values).any())


# ------------------------------------------------------------------------------- plotting
def save_figure(fig: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    data = buffer.getvalue()
    return atomic_write(path, lambda handle: handle.write(data))


def new_figure(rows: int, title: str) -> tuple[Figure, list[Axes]]:
    """A figure of ``rows`` panels stacked on a shared x axis (steps or epochs)."""
    fig = Figure(figsize=(WIDTH, ROW_HEIGHT * rows + 0.4), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    fig.suptitle(title, fontsize=12)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, list(axes)


def metrics_x(metrics: Sequence[dict[str, Any]]) -> tuple[np.ndarray, str]:
    """x values and label for per-epoch rows: the step at the end of each epoch when the rows
    have one (so that they line up with the per-step figures), else the epoch."""
    steps = column(metrics, "step")
    if has_data(steps):
        return steps, "optimizer step (end of epoch)"
    return epoch_axis(metrics), "epoch"


def epoch_axis(metrics: Sequence[dict[str, Any]]) -> np.ndarray:
    return np.array([to_float(row.get("epoch", i + 1)) for i, row in enumerate(metrics)])


def column(metrics: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    return finite(np.array([to_float(row.get(key)) for row in metrics], dtype=float))


def suffixes(keys: Iterable[str], prefixes: str | tuple[str, ...]) -> list[str]:
    """What follows the prefix in the keys that start with one of ``prefixes``, first seen
    first (``"val_dice/TC"`` -> ``"TC"``)."""
    return list(dict.fromkeys(k.split("/", 1)[1] for k in keys if k.startswith(prefixes)))


def loss_figure(name: str, telemetry: dict[str, np.ndarray], metrics: Sequence[dict[str, Any]],
                loss_label: str = "training loss") -> Figure | None:
    """Per-step loss from the telemetry, else per-epoch ``train_loss`` from the metrics."""
    if has_data(telemetry.get("loss")):
        loss = finite(telemetry["loss"])
        x = telemetry.get("step", np.arange(loss.size, dtype=float))
        lr, unit, xlabel = telemetry.get("lr"), "steps", "optimizer step"
    elif metrics and has_data(column(metrics, "train_loss")):
        loss, lr, unit = column(metrics, "train_loss"), column(metrics, "lr"), "epochs"
        x, xlabel = metrics_x(metrics)
    else:
        return None
    fig, (ax,) = new_figure(1, f"{name}: training loss")
    window = smoothing_window(loss.size) if unit == "steps" else 1
    if unit == "steps":
        handles = ax.plot(x, loss, color="tab:blue", lw=0.7, alpha=0.35, label="loss per step")
    else:
        handles = ax.plot(x, loss, color="tab:blue", lw=1.8, marker="o", ms=3,
                          label="mean loss per epoch")
    if window > 1:
        handles += ax.plot(x, moving_average(loss, window), color="tab:blue", lw=2.2,
                           label=f"loss, {smoothing_label(window, unit)}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(loss_label)
    if has_data(lr):
        right = ax.twinx()
        handles += right.plot(x, finite(lr), color="tab:orange", lw=1.4, ls="--",
                              label="learning rate (right axis)")
        right.set_ylabel("learning rate", color="tab:orange")
        right.tick_params(axis="y", colors="tab:orange")
        right.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        right.set_ylim(bottom=0)
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=9)
    return fig


def balance_figure(name: str, telemetry: dict[str, np.ndarray], metrics: Sequence[dict[str, Any]],
                   head_metric: str = "Dice", head_key: str = "head_dice/") -> Figure | None:
    """Per-modality panels from the step telemetry, else from the per-epoch metrics.

    ``head_metric`` names the heads' utilization metric (``eps``) in labels; ``head_key`` is
    the prefix of its per-epoch column in the metrics rows (e.g. ``head_dice/flair``)."""
    source: dict[str, np.ndarray]
    if any(has_data(v) for k, v in telemetry.items() if k.startswith(TELEMETRY_PANEL_PREFIXES)):
        source, which = telemetry, 0
        x = telemetry.get("step", np.arange(len(next(iter(telemetry.values()))), dtype=float))
        xlabel, unit = "optimizer step", "steps"
    else:
        keys = list(dict.fromkeys(k for row in metrics for k in row))
        prefixes = (*MODALITY_PREFIXES, head_key)
        source = {k.replace(head_key, "head_metric/", 1) if k.startswith(head_key) else k: column(metrics, k)
                  for k in keys if k.startswith(prefixes)}
        (x, xlabel), which, unit = metrics_x(metrics), 1, "epochs"
    modalities = suffixes(source, (*MODALITY_PREFIXES, "head_metric/"))
    panels = []
    for spec in BALANCE_PANELS:
        prefix = spec[which]
        series = {m: source[prefix + m] for m in modalities if has_data(source.get(prefix + m))}
        if series:
            panels.append((spec[0], series, spec[2].format(metric=head_metric), spec[3].format(metric=head_metric)))
    if not panels:
        return None
    colors = {m: MODALITY_PALETTE[i % len(MODALITY_PALETTE)] for i, m in enumerate(modalities)}
    window = smoothing_window(len(x)) if unit == "steps" else 1
    fig, axes = new_figure(len(panels), f"{name}: training-only auxiliary heads and the balancer's coefficients "
                                     f"({smoothing_label(window, unit)})")
    marker = "o" if window == 1 else None
    for ax, (kind, series, ylabel, title) in zip(axes, panels):
        curves = {m: moving_average(v, window) for m, v in series.items()}
        for m, curve in curves.items():
            ax.plot(x, curve, color=colors[m], lw=1.8, marker=marker, ms=3)
        if kind in ("eps/", "score/"):  # Dice, accuracy or a probability
            ax.set_ylim(-0.02, 1.02)
        elif kind in UNIT_PANELS:
            ax.axhline(1.0, color="0.3", ls="--", lw=1.2)
            if kind == "B/" and _limit_b_axis(ax, list(curves.values())):
                title += f" (y axis clipped to [{B_YLIM[0]:g}, {B_YLIM[1]:g}])"
        else:
            ax.axhline(0.0, color="0.5", lw=0.8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
    axes[-1].set_xlabel(xlabel)
    handles = [Line2D([], [], color=colors[m], lw=1.8, marker=marker, label=m) for m in modalities]
    if any(kind in UNIT_PANELS for kind, *_ in panels):
        handles.append(Line2D([], [], color="0.3", ls="--", lw=1.2, label="1 (gradient unchanged)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=9)
    return fig


def _limit_b_axis(ax: Axes, curves: list[np.ndarray]) -> bool:
    """y limits that hold 0, 1 and the curves, within ``B_YLIM`` so that a blow-up does not
    flatten everything else. Returns whether some value lies outside."""
    values = np.concatenate([c[np.isfinite(c)] for c in curves] + [np.array([0.0, 1.0])])
    low, high = float(values.min()), float(values.max())
    clipped = low < B_YLIM[0] or high > B_YLIM[1]
    low, high = max(low, B_YLIM[0]), min(high, B_YLIM[1])
    margin = 0.05 * (high - low)
    ax.set_ylim(low - margin, high + margin)
    return clipped
