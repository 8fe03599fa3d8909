"""Figures of a training run, drawn from the files the run writes: ``metrics.jsonl`` (one JSON
object per finished epoch) and ``telemetry.csv`` (one row per optimizer step). :func:`plot_run`
writes ``loss.png`` (training loss and learning rate), ``dice.png`` (validation Dice and HD95
per region) and ``balance.png`` (per-modality head Dice, CGGM coefficients ``B`` and gradient
cosines) into ``RUN/plots/``, each only when the files hold what it needs, so that it works on a
run that is still training, on a baseline without auxiliary heads and on a run whose telemetry
is missing. Matplotlib ``Figure`` objects are used directly (Agg, no pyplot state), and every
PNG is written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from multimodal_general.runs.plots import (
    MODALITY_PALETTE,
    balance_figure,
    column,
    epoch_axis,
    has_data,
    loss_figure,
    new_figure,
    read_metrics,
    read_telemetry,
    save_figure,
    suffixes,
)
from multimodal_general.runs.series import moving_average

__all__ = ["moving_average", "plot_run", "read_metrics", "read_telemetry"]

REGION_COLORS = {"TC": "tab:red", "WT": "tab:green", "ET": "tab:blue", "mean": "black"}


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write ``loss.png``, ``dice.png`` and ``balance.png`` into ``run_dir/plots/``, each only
    when the run's files hold its data; returns the paths written."""
    run_dir = Path(run_dir)
    name = run_dir.resolve().name or str(run_dir)
    metrics, telemetry = read_metrics(run_dir), read_telemetry(run_dir)
    figures = {
        "loss.png": loss_figure(name, telemetry, metrics, "training loss (Dice + BCE)"),
        "dice.png": _dice_figure(name, metrics),
        "balance.png": balance_figure(name, telemetry, metrics),
    }
    return [save_figure(fig, run_dir / "plots" / file) for file, fig in figures.items() if fig]


def _dice_figure(name: str, metrics: Sequence[dict[str, Any]]) -> Figure | None:
    """Validation Dice per region (and mean) vs epoch; HD95 per region on a second panel."""
    rows = [row for row in metrics if any(k.startswith("val_") for k in row)]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    dice_regions, hd_regions = suffixes(keys, "val_dice/"), suffixes(keys, "val_hd95/")
    dice = {r: column(rows, f"val_dice/{r}") for r in dice_regions}
    hd95 = {r: column(rows, f"val_hd95/{r}") for r in hd_regions}
    heads = {m: column(rows, f"val_head_dice/{m}") for m in suffixes(keys, "val_head_dice/")}
    dice = {r: v for r, v in dice.items() if has_data(v)}
    hd95 = {r: v for r, v in hd95.items() if has_data(v)}
    heads = {m: v for m, v in heads.items() if has_data(v)}
    panels = [(dice, "Dice", "Dice per region (higher is better)")] if dice else []
    if hd95:
        panels.append((hd95, "HD95 (mm)", "95th-percentile Hausdorff distance (lower is better)"))
    if heads:
        panels.append((heads, "Dice", "each sequence's auxiliary head alone (Dice, mean of regions)"))
    if not panels:
        return None
    epochs = epoch_axis(rows)
    fig, axes = new_figure(len(panels), f"{name}: validation")
    for ax, (series, ylabel, title) in zip(axes, panels):
        for i, (region, values) in enumerate(series.items()):
            color = REGION_COLORS.get(region, MODALITY_PALETTE[(i if series is heads else i + 4) % len(MODALITY_PALETTE)])
            ax.plot(epochs, values, marker="o", ms=4, color=color, label=region,
                    lw=2.2 if region == "mean" else 1.5, ls="--" if region == "mean" else "-")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    for ax, (series, ylabel, _) in zip(axes, panels):
        if ylabel == "Dice":
            ax.set_ylim(-0.02, 1.02)
        else:
            ax.set_ylim(bottom=0)
    axes[-1].set_xlabel("epoch")
    return fig


