"""BraTS phantoms: joint training vs CGGM vs early fusion, several seeds, one table.

Every run is ``brats-cggm train`` at the ``cpu-small`` preset on the same phantom cases
and the same split (the seed changes initialisation, patches and augmentation only);
runs already finished (``RUN/summary.json``) are not recomputed. Reported per method:
validation Dice per region at the best epoch (mean ± std over seeds) and, for the
multi-branch networks, each sequence's auxiliary-head Dice on the validation cases at
the end of training: how well each branch alone segments the tumour.

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
    "early_fusion": ["--network", "early_fusion", "--balancer", "none",
                     "--set", "network.overrides={channels: [8, 16, 32, 64], num_res_units: 1}"],
}
REGIONS = ("TC", "WT", "ET")
SEQUENCES = ("flair", "t1", "t1ce", "t2")
CLI = [sys.executable, "-c", "from brats_cggm.cli import main; main()"]


def run(out: Path, method: str, seed: int, data: Path, epochs: int) -> dict:
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
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    best = next(r for r in rows if r["epoch"] == summary["best_epoch"])
    last = rows[-1]
    return {
        "method": method, "seed": seed, "best_epoch": summary["best_epoch"],
        **{f"dice/{r}": best[f"val_dice/{r}"] for r in REGIONS},
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
        "| method | Dice TC | Dice WT | Dice ET | mean | head FLAIR | head T1 | head T1ce | head T2 | step s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        rows = [r for r in results if r["method"] == method]
        if not rows:
            continue
        means = [sum(r[f"dice/{g}"] for g in REGIONS) / 3 for r in rows]
        cells = [mean_std([r[f"dice/{g}"] for r in rows]) for g in REGIONS] + [mean_std(means)]
        cells += [mean_std([r[f"head/{s}"] for r in rows]) for s in SEQUENCES]
        cells.append(f"{statistics.median(r['step_s'] for r in rows):.2f}")
        lines.append(f"| {method} ({len(rows)} seeds) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/brats_phantoms"))
    parser.add_argument("--data", type=Path, default=None, help="phantom folder (default: OUT/phantoms, written if missing)")
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
    results = [run(args.out, m, s, data, args.epochs) for s in args.seeds for m in args.methods]
    text = (
        f"BraTS phantoms ({data}), cpu-small preset, {args.epochs} epochs, seeds {args.seeds}: "
        "validation Dice at the best epoch; head = each sequence's auxiliary head alone "
        "(validation Dice, mean of regions) at the end.\n\n" + table(results) + "\n"
    )
    print(text)
    atomic_write_text(args.out / "results.md", text)
    record = {"provenance": provenance("torch", "monai"), "settings": vars(args) | {"out": str(args.out), "data": str(data)},
              "runs": results}
    atomic_write_text(args.out / "results.json", json.dumps(record, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
