"""Figures of a training run (brats_cggm.training.plots) from synthetic run folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from brats_cggm.training.plots import (
    moving_average,
    plot_run,
    read_metrics,
    read_telemetry,
)
from multimodal_general.errors import BadDataFile

MODALITIES = ("flair", "t1", "t1ce", "t2")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run: Path, *, steps: int = 40, epochs: int = 5, modalities=MODALITIES,
              balancer: bool = True, telemetry: bool = True, seed: int = 0) -> Path:
    """A run folder as the trainer writes it: validation on epochs 2 and 4, a few empty cells."""
    rng = np.random.default_rng(seed)
    run.mkdir(parents=True, exist_ok=True)
    per_epoch = steps // epochs
    t = np.arange(steps) / steps
    head = {m: np.clip(0.8 * (1 - np.exp(-3 * t * (i + 1))) + rng.normal(0, 0.05, steps), 0, 1)
            for i, m in enumerate(modalities)}
    if telemetry:
        columns = ["step", "epoch", "loss", "lr"]
        if modalities:
            for prefix in ("eps", "d", "B", "cos", "grad_norm") if balancer else ("eps",):
                columns += [f"{prefix}/{m}" for m in modalities]
            columns += ["L_gm"] if balancer else []
        with (run / "telemetry.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for s in range(steps):
                row = {"step": s + 1, "epoch": s // per_epoch + 1,
                       "loss": 1.5 * np.exp(-2 * t[s]) + rng.normal(0, 0.05), "lr": 0.01 * (1 - t[s])}
                for i, m in enumerate(modalities):
                    row |= {f"eps/{m}": head[m][s], f"d/{m}": rng.normal(0.01, 0.01),
                            f"B/{m}": 1.2 - 0.3 * i + rng.normal(0, 0.1),
                            f"cos/{m}": rng.normal(0.2, 0.1), f"grad_norm/{m}": rng.uniform(0.1, 1)}
                row["L_gm"] = rng.uniform(0, 0.1)
                cells = [f"{row[c]:.6g}" for c in columns]
                if s % 7 == 3:  # empty cells, as after a step whose head metric was undefined
                    for blank in {"loss", f"eps/{modalities[0]}" if modalities else "loss", columns[-1]}:
                        cells[columns.index(blank)] = ""
                writer.writerow(cells)
    with (run / "metrics.jsonl").open("w") as handle:
        for e in range(1, epochs + 1):
            row = {"epoch": e, "step": e * per_epoch, "lr": 0.01 * (1 - e / epochs),
                   "train_loss": 1.5 * np.exp(-2 * e / epochs), "time_s": 12.3, "step_s": 0.41}
            if modalities:
                row |= {f"head_dice/{m}": float(head[m][e * per_epoch - 1]) for m in modalities}
                if balancer:
                    row |= {f"{key}/{m}": 1.0 for m in modalities for key in ("B", "cos")}
            if e % 2 == 0:
                done = 1 - np.exp(-4 * e / epochs)
                dice = {"TC": 0.75 * done, "WT": 0.88 * done, "ET": 0.65 * done}
                row |= {f"val_dice/{r}": v for r, v in dice.items()}
                row |= {"val_dice/mean": sum(dice.values()) / 3, "val_hd95/TC": 12 + 40 * (1 - done),
                        "val_hd95/WT": 6 + 30 * (1 - done), "val_hd95/ET": float("nan") if e == 2 else 9 + 50 * (1 - done)}
            handle.write(json.dumps(row) + "\n\n")
    return run


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


def names(paths: list[Path]) -> list[str]:
    return sorted(p.name for p in paths)


def test_full_run_writes_three_figures(tmp_path):
    run = write_run(tmp_path / "cggm-run")
    written = plot_run(run)
    assert names(written) == ["balance.png", "dice.png", "loss.png"]
    for path in written:
        assert path.parent == run / "plots"
        assert_png(path)
    assert not [p for p in (run / "plots").iterdir() if p.name.startswith(".")]  # no temp files


def test_early_fusion_run_has_no_balance_figure(tmp_path):
    run = write_run(tmp_path / "early-fusion", modalities=())
    written = plot_run(run)
    assert names(written) == ["dice.png", "loss.png"]
    assert not (run / "plots" / "balance.png").exists()


def test_balancer_none_with_three_modalities_still_plots_head_dice(tmp_path):
    run = write_run(tmp_path / "none", balancer=False, modalities=("flair", "t1ce", "t2"))
    assert names(plot_run(str(run))) == ["balance.png", "dice.png", "loss.png"]


def test_missing_telemetry_still_gives_dice_and_per_epoch_figures(tmp_path):
    run = write_run(tmp_path / "no-telemetry", telemetry=False)
    written = plot_run(run)
    # loss and balance from the per-epoch train_loss, head_dice/*, B/* and cos/*
    assert names(written) == ["balance.png", "dice.png", "loss.png"]
    for path in written:
        assert_png(path)


def test_empty_and_missing_files(tmp_path):
    assert plot_run(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text("\n")
    (tmp_path / "telemetry.csv").write_text("")
    assert plot_run(tmp_path) == []
    (tmp_path / "telemetry.csv").write_text("step,epoch,loss,lr\n")
    assert plot_run(tmp_path) == []


def test_metrics_without_validation_give_no_dice_figure(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 0.9}) + "\n")
    assert names(plot_run(tmp_path)) == ["loss.png"]


def test_malformed_metrics_line_names_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n\n{"epoch": 2,\n')
    with pytest.raises(BadDataFile, match="line 3 is not JSON") as caught:
        read_metrics(tmp_path)
    assert caught.value.path == path
    with pytest.raises(BadDataFile, match="metrics.jsonl"):
        plot_run(tmp_path)


def test_readers(tmp_path):
    write_run(tmp_path, steps=10, epochs=5)
    metrics = read_metrics(tmp_path)
    assert [row["epoch"] for row in metrics] == [1, 2, 3, 4, 5]
    assert np.isnan(metrics[1]["val_hd95/ET"])
    telemetry = read_telemetry(tmp_path)
    assert list(telemetry)[:4] == ["step", "epoch", "loss", "lr"]
    assert all(v.dtype == float and v.shape == (10,) for v in telemetry.values())
    assert np.isnan(telemetry["eps/flair"][3]) and np.isnan(telemetry["L_gm"][3])
    assert np.isnan(telemetry["loss"][3])
    assert np.isfinite(telemetry["eps/flair"][2])


def test_read_telemetry_short_rows_and_bad_cells(tmp_path):
    (tmp_path / "telemetry.csv").write_text("step,loss,eps/t1\n1,0.5,0.2\n2,x\n")
    columns = read_telemetry(tmp_path)
    np.testing.assert_array_equal(columns["step"], [1.0, 2.0])
    assert columns["loss"][0] == 0.5 and np.isnan(columns["loss"][1])
    assert np.isnan(columns["eps/t1"][1])


def test_moving_average_skips_nan():
    values = np.array([1.0, np.nan, 3.0, 5.0, np.nan, np.nan, np.nan])
    smooth = moving_average(values, 3)
    np.testing.assert_allclose(smooth[:5], [1.0, 2.0, 4.0, 4.0, 5.0])
    assert np.isnan(smooth[5]) and np.isnan(smooth[6])
    assert moving_average(np.array([]), 5).size == 0
    np.testing.assert_array_equal(moving_average(np.array([2.0, np.inf]), 1), [2.0, np.nan])
