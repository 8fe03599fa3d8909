"""Seconds per stage of the raw path, per case, and its peak memory, on this machine.

Each case runs in a fresh process (``--one``) that ingests it, segments it with the shipped
default model, maps the labels back and writes everything (``predict --raw``'s work), then
reports its stages and its own peak resident memory. Cases:

* ``phantom``: a phantom examination as DICOM series on 3 mm grids (made here; always runs);
* ``clinical``: a real BraTS case moved onto clinical grids (5 mm FLAIR, sagittal T1, ...) as
  DICOM series (needs ``../shared/data/real``);
* ``tcga``: the raw TCGA-FG-6692 examination, skull on, 5.5 mm slices (needs ``../shared/data/raw``).

Targets (2 cores): a whole raw case <= 60 s, ingest <= 30 s, peak memory <= 3 GiB.

    python bench/ingest_speed.py          # ~3 min
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent.parent / "shared" / "data"
RESULTS = ROOT / "results"
CASES = ("phantom", "clinical", "tcga")


def make_case(kind: str, scratch: Path) -> tuple[Path, list[str]] | None:
    """The raw examination of ``kind`` (folder, --skip items), or None when its data is absent."""
    import SimpleITK as sitk

    from brats_cggm import MODALITIES
    from brats_cggm.raw import simulate

    if kind == "tcga":
        folder = SHARED / "raw" / "tcga_fg_6692"
        return (folder, ["reference"]) if folder.is_dir() else None
    if kind == "phantom":
        from brats_cggm.data.phantom import generate_case
        from brats_cggm.raw.grids import image_from

        case = generate_case(3, 64)
        images = {m: image_from(case.images[m], case.affine) for m in MODALITIES}
        grids = {m: ((3.0, 3.0, 3.0), "sagittal" if m == "t1" else "axial") for m in MODALITIES}
    else:
        source = SHARED / "real" / "brats2018" / "Brats18_2013_20_1"
        if not source.is_dir():
            return None
        images = {m: sitk.Cast(sitk.ReadImage(str(source / f"{source.name}_{m}.nii.gz")), sitk.sitkFloat32) for m in MODALITIES}
        grids = simulate.CLINICAL
    simulate.write_examination(images, scratch / kind, seed=0, grids=grids)
    return scratch / kind, []


def one(kind: str) -> dict | None:
    """Run the whole raw path on one case in this process; its stages and peak memory."""
    from brats_cggm.inference.segmenter import Segmenter
    from brats_cggm.raw.ingest import Ingest
    from brats_cggm.raw.native import native_prediction, write_raw_prediction

    with tempfile.TemporaryDirectory() as scratch:
        made = make_case(kind, Path(scratch))
        if made is None:
            return None
        folder, skip = made
        segmenter = Segmenter.load(None)
        start = time.perf_counter()
        case = Ingest(kind, folder, skip=skip).run()
        ingest = time.perf_counter() - start
        prediction = segmenter.predict_arrays(case.arrays, case.atlas_affine, kind)
        segment = time.perf_counter() - start - ingest
        native = native_prediction(prediction, case, segmenter.threshold)
        write_raw_prediction(prediction, native, case, Path(scratch) / "out", segmenter.model_info)
        back = time.perf_counter() - start - ingest - segment
    return {"case": kind, "stages_s": case.record["seconds"], "ingest_s": round(ingest, 2), "segment_s": round(segment, 2),
            "map_back_and_write_s": round(back, 2), "total_s": round(ingest + segment + back, 2),
            "peak_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def table(rows: list[dict]) -> str:
    stages = list(rows[0]["stages_s"])
    lines = [f"| case | {' | '.join(stages)} | ingest | segment | map back + write | **total** | peak memory (GiB) |",
             "|---|" + "---|" * (len(stages) + 5)]
    for r in rows:
        seconds = " | ".join(f"{r['stages_s'][s]:.1f}" for s in stages)
        lines.append(f"| {r['case']} | {seconds} | {r['ingest_s']:.1f} | "
                     f"{r['segment_s']:.1f} | {r['map_back_and_write_s']:.1f} | **{r['total_s']:.1f}** | {r['peak_memory_gib']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--one", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one)))
        return
    rows = []
    for kind in args.cases:
        done = subprocess.run([sys.executable, __file__, "--one", kind], capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        if row is None:
            print(f"{kind}: skipped (its data is absent)")
            continue
        rows.append(row)
        print(f"{kind}: {row['total_s']} s, peak {row['peak_memory_gib']} GiB", flush=True)
    text = ("# Raw path speed (seconds per stage, 2 cores)\n\n`python bench/ingest_speed.py` (see its docstring). "
            "Targets: total <= 60 s, ingest <= 30 s, peak memory <= 3 GiB.\n\n" + table(rows) + "\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ingest_speed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
