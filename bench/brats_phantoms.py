"""BraTS phantoms: joint training vs CGGM vs modality dropout vs early fusion, several
seeds, one table: the comparison harness of the segmentation side, driven through ``brats-cggm``.

Every run is ``brats-cggm train`` at the ``cpu-small`` preset (same epochs, learning rate,
batch and patches for every method) on the same phantom cases and the same train/validation
split (the seed changes initialisation, patches and augmentation only); each run keeps the
epoch with the best validation Dice. Then ``brats-cggm evaluate`` scores that
checkpoint on held-out phantoms of another generator seed (``--test-data``, written if
missing; ``evaluate --split all`` over that folder), which no run ever saw or selected on.
Runs already finished (``RUN/summary.json``, ``RUN/evaluation/all/summary.json``) are not
recomputed. Reported per method (mean ± std
over seeds): test Dice per region, the validation Dice of the selected epoch, and for the
multi-branch networks each sequence's auxiliary-head Dice on the validation cases at the end
of training (how well each branch alone segments the tumour).

Methods: ``none`` (joint training), ``cggm`` (stable preset), ``mmpareto``, ``agm`` (mono-modal
responses through the modality mask, scored by soft Dice), ``mslr`` (adaptive per-encoder
learning rates from each head's validation Dice), ``gblending`` (loss weights from the heads'
train/validation losses, updated at each validation), ``modality_dropout`` (joint training with
each sequence dropped with probability 0.25 through the network's modality mask),
``early_fusion`` (one 4-channel U-Net: the reference without per-sequence branches). Every
baseline runs at its defaults (docs/baselines.md); ``ogm_ge`` cannot serve the segmentation
network (see docs/baselines.md, "Where each one runs today").

    python bench/brats_phantoms.py --out bench/results/brats_phantoms --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from multimodal_general.io import atomic_write_text
from multimodal_general.provenance import provenance

METHODS = {
    "none": ["--balancer", "none"],
    "cggm": ["--balancer", "cggm", "--cggm-preset", "stable"],
    "mmpareto": ["--balancer", "mmpareto"],
    "agm": ["--balancer", "agm"],
    "mslr": ["--balancer", "mslr"],
    "gblending": ["--balancer", "gblending"],
    "modality_dropout": ["--balancer", "none", "--set", "network.modality_dropout=0.25"],
    "early_fusion": ["--network", "early_fusion", "--balancer", "none",
                     "--set", "network.overrides={channels: [8, 16, 32, 64], num_res_units: 1}"],
}
REGIONS = ("TC", "WT", "ET")
SEQUENCES = ("flair", "t1", "t1ce", "t2")
CLI = [sys.executable, "-c", "from brats_cggm.cli import main; main()"]


def run(out: Path, method: str, seed: int, data: Path, epochs: int, test_data: Path) -> dict:
    run_dir = out / "runs" / f"{method}-seed{seed}"
    if not (run_dir / "summary.json").exists():
        command = [*CLI, "train", "--data", str(data), "--out", str(run_dir), "--preset", "cpu-small",
                   "--seed", str(seed), "--epochs", str(epochs), "--set", "validation.every=2",
                   *METHODS[method]]
        resume = ["--resume"] if (run_dir / "checkpoints" / "last.pt").exists() else []
        if resume:
            command = [*CLI, "train", "--out", str(run_dir), "--resume"]
        started = time.perf_counter()
        subprocess.run(command, check=True)
        atomic_write_text(run_dir / "wall_s.txt", f"{time.perf_counter() - started:.1f}\n")
    # every case of the held-out folder: another generator seed, never seen by any run (its case
    # ids repeat the training ones, so `--split test`, which goes by id, would find none)
    test_summary = run_dir / "evaluation" / "all" / "summary.json"
    if not test_summary.exists():
        subprocess.run([*CLI, "evaluate", "--run", str(run_dir), "--data", str(test_data), "--split", "all"],
                       check=True)
    test = json.loads(test_summary.read_text())["metrics"]
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    best = next(r for r in rows if r["epoch"] == summary["best_epoch"])
    last = rows[-1]
    return {
        "method": method, "seed": seed, "best_epoch": summary["best_epoch"],
        **{f"dice/{r}": best[f"val_dice/{r}"] for r in REGIONS},
        **{f"test_dice/{r}": test[f"dice/{r}"]["mean"] for r in REGIONS},
        **{f"test_hd95/{r}": test[f"hd95/{r}"]["mean"] for r in REGIONS},
        **{f"hd95/{r}": best.get(f"val_hd95/{r}") for r in REGIONS},
        **{f"head/{s}": last.get(f"val_head_dice/{s}") for s in SEQUENCES},
        **{f"B/{s}": last.get(f"B/{s}") for s in SEQUENCES},
        "step_s": statistics.median(r["step_s"] for r in rows),
    }


def mean_std(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def table(results: list[dict]) -> str:
    lines = [
        "| method | test Dice TC | test Dice WT | test Dice ET | test mean | val mean (selected epoch) "
        "| head FLAIR | head T1 | head T1ce | head T2 | step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        rows = [r for r in results if r["method"] == method]
        if not rows:
            continue
        means = [sum(r[f"test_dice/{g}"] for g in REGIONS) / 3 for r in rows]
        val_means = [sum(r[f"dice/{g}"] for g in REGIONS) / 3 for r in rows]
        cells = [mean_std([r[f"test_dice/{g}"] for r in rows]) for g in REGIONS]
        cells += [mean_std(means), mean_std(val_means)]
        cells += [mean_std([r[f"head/{s}"] for r in rows]) for s in SEQUENCES]
        cells.append(f"{statistics.median(r['step_s'] for r in rows):.2f}")
        lines.append(f"| {method} ({len(rows)} seeds) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/brats_phantoms"))
    parser.add_argument("--data", type=Path, default=None, help="phantom folder (default: OUT/phantoms, written if missing)")
    parser.add_argument("--test-data", type=Path, default=None,
                        help="held-out phantoms (default: OUT/test_phantoms, 10 cases of generator seed 1)")
    parser.add_argument("--cases", type=int, default=30)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    data = args.data or args.out / "phantoms"
    if not data.exists():
        subprocess.run([*CLI, "phantom", "--out", str(data), "--cases", str(args.cases),
                        "--size", str(args.size), "--seed", "0"], check=True)
    test_data = args.test_data or args.out / "test_phantoms"
    if not test_data.exists():
        subprocess.run([*CLI, "phantom", "--out", str(test_data), "--cases", "10",
                        "--size", str(args.size), "--seed", "1"], check=True)
    results = [run(args.out, m, s, data, args.epochs, test_data) for s in args.seeds for m in args.methods]
    text = (
        f"BraTS phantoms ({data}), cpu-small preset, {args.epochs} epochs, seeds {args.seeds}. "
        "Each run is selected on its validation cases (best mean Dice) and scored on held-out "
        f"phantoms ({test_data}, never seen nor used for selection): test Dice mean ± std over "
        "seeds; val mean = validation mean Dice of the selected epoch; head = each sequence's "
        "auxiliary head alone (validation Dice, mean of regions) at the end.\n\n"
        f"Command: `python bench/brats_phantoms.py --out {args.out} --seeds {' '.join(map(str, args.seeds))} "
        f"--epochs {args.epochs} --methods {' '.join(args.methods)}`\n\n" + table(results) + "\n"
    )
    print(text)
    atomic_write_text(args.out / "results.md", text)
    record = {"provenance": provenance("torch", "monai"),
              "settings": vars(args) | {"out": str(args.out), "data": str(data), "test_data": str(test_data)},
              "runs": results}
    atomic_write_text(args.out / "results.json", json.dumps(record, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
