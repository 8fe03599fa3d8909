"""BraTS phantoms: every balancer the segmentation network serves, several seeds, one table.

Writes the phantoms if they are missing (30 training/validation cases of generator seed 0, and
10 held-out test cases of generator seed 1, 96^3), then runs ``brats-cggm compare``
(:mod:`brats_cggm.compare`) at the ``cpu-small`` preset, 20 epochs, validation every 2 epochs:
the same budget for every method, each run selected on its validation cases and scored on the
held-out phantoms. Finished runs in ``OUT/runs`` are reused. Methods and their settings:
``brats_cggm.compare.METHODS`` (every baseline at its defaults, docs/baselines.md).

    python bench/brats_phantoms.py --out runs/brats_phantoms --seeds 3
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from brats_cggm.compare import METHODS, compare
from brats_cggm.data.phantom import write_phantoms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/brats_phantoms"))
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default="all", help=f"comma-separated, or all ({', '.join(METHODS)})")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    data, test_data = args.out / "phantoms", args.out / "test_phantoms"
    for folder, cases, seed in ((data, 30, 0), (test_data, 10, 1)):
        if not folder.exists():
            write_phantoms(folder, cases, size=args.size, layout="brats2021", seed=seed)
    compare(data, args.methods, args.seeds, args.out, test_data=test_data, preset="cpu-small",
            settings={"optim.epochs": args.epochs, "validation.every": 2})
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
