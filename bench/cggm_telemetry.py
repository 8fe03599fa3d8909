"""CGGM on real cases, over training: each sequence's coefficient ``B`` and its auxiliary head's
Dice (training batches, epoch means), for every CGGM row of the protocol (bench/real_cv.py),
one line per fold and the fold mean in bold; the joint-training rows' heads beside them.

Reads the run folders the protocol trained (``OUT/<group>/fold<k>/runs/<method>-seed0``); rows
or folds not trained are left out. Writes ``RESULTS/cggm_telemetry.png`` and prints, per row
and sequence, B and head Dice averaged over the second half of training.

    python bench/cggm_telemetry.py --protocol runs/real_cv_paired
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from real_cv import ROWS

from brats_cggm import MODALITIES
from multimodal_general.runs.plots import MODALITY_PALETTE, column, read_metrics, save_figure

#: the B axis (the paper's unguarded rule has epochs far outside it, which are noted on the panel)
B_RANGE = (-2.0, 4.0)
#: the rows drawn: CGGM (B and heads) and joint training with the same fusion (heads only)
DEFAULT_ROWS = ("slots-cggm-paper-dropout", "slots-cggm-deficit-dropout", "slots-cggm-deficit-dropout-nodir", "slots-cggm-deficit-dropout-lr", "slots-dropout")


def row_runs(protocol: Path, key: str, folds: int) -> list[list[dict]]:
    """The epoch rows of every trained fold of ``key`` (``[]`` for a fold not trained)."""
    row = ROWS[key]
    runs = [read_metrics(protocol / row.group / f"fold{k}" / "runs" / f"{row.method}-seed0") for k in range(folds)]
    return [r for r in runs if r]


def figure(protocol: Path, keys: list[str], folds: int) -> tuple[Figure, list[str]]:
    drawn = [(key, row_runs(protocol, key, folds)) for key in keys]
    drawn = [(key, runs) for key, runs in drawn if runs]
    fig = Figure(figsize=(5.2 * max(len(drawn), 1), 7.5), layout="constrained")
    axes = fig.subplots(2, max(len(drawn), 1), squeeze=False, sharex=True)
    fig.suptitle("CGGM per sequence over training, real cases\n(epoch means; thin: each fold, bold: their mean)")
    lines = []
    for j, (key, runs) in enumerate(drawn):
        for i, (prefix, label) in enumerate((("B/", "B (encoder gradient scale)"),
                                             ("head_dice/", "head Dice (training batches)"))):
            ax = axes[i, j]
            for m, name in enumerate(MODALITIES):
                series = [column(run, prefix + name) for run in runs]
                series = [s for s in series if np.isfinite(s).any()]
                if not series:
                    continue
                color = MODALITY_PALETTE[m % len(MODALITY_PALETTE)]
                for s in series:
                    ax.plot(np.arange(1, len(s) + 1), s, color=color, alpha=0.3, linewidth=0.8)
                length = min(len(s) for s in series)
                mean = np.nanmean([s[:length] for s in series], axis=0)
                ax.plot(np.arange(1, length + 1), mean, color=color, linewidth=2, label=name)
                late = np.nanmean([np.nanmean(s[len(s) // 2:]) for s in series])
                lines.append(f"{key:28s} {prefix[:-1]:10s} {name:6s} {late:.3f} (second half, {len(series)} fold(s))")
            if prefix == "B/":
                ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
                low, high = ax.get_ylim()
                if low < B_RANGE[0] or high > B_RANGE[1]:  # the paper's rule spikes where improvements cancel
                    ax.set_ylim(*B_RANGE)
                    ax.text(0.01, 0.02, f"clipped to {B_RANGE}: epoch means reach {low:.0f} and {high:.0f}",
                            transform=ax.transAxes, fontsize=7)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(f"{ROWS[key].label}\n({len(runs)} fold(s))", fontsize=9)
            else:
                ax.set_xlabel("epoch")
        axes[0, j].legend(fontsize=8)
    return fig, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", type=Path, default=Path("runs/real_cv_paired"), help="real_cv.py's --out")
    parser.add_argument("--results", type=Path, default=Path("bench/results"))
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    parser.add_argument("--folds", type=int, default=3)
    args = parser.parse_args()
    keys = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = sorted(set(keys) - set(ROWS))
    if unknown:
        parser.error(f"unknown row(s) {unknown}")
    fig, lines = figure(args.protocol, keys, args.folds)
    if not lines:
        raise SystemExit(f"error: no trained run of {', '.join(keys)} under {args.protocol}")
    print("\n".join(lines))
    print(f"wrote {save_figure(fig, args.results / 'cggm_telemetry.png')}")


if __name__ == "__main__":
    main()
