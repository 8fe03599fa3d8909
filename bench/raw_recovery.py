"""Known-transform recovery through the raw path, on the real labelled cases.

Each BraTS-ready case of ``--data`` is turned into a raw examination with known answers
(``brats_cggm.raw.simulate``): every sequence moved by its own random rigid transform (up to
15 degrees, 20 mm) and resampled onto its own grid, written as classic DICOM series, on two
kinds of grid:

* ``1mm``: 1 mm isotropic, axial;
* ``clinical``: FLAIR 0.9x0.9x5 mm axial, T1 1x1x4 mm sagittal, T1ce 1x1x3 mm axial, T2
  0.9x0.9x4 mm axial.

``brats-cggm``'s raw chain then ingests, segments (the shipped default model) and maps the
labels back to the T1ce series' grid; the labels are carried to the original grid through the
true T1ce transform (nearest neighbour) and compared. Per case and grid it records:

* the mean displacement error (mm) over the brain of each sequence-to-T1ce transform found,
  against the true one (target <= 1 mm);
* Dice (WT, TC, ET) of the raw path against the BraTS-ready path (the same model on the
  original case; 1 mm grids: target WT within 0.02) and against the reference labels;
* on clinical grids, the same chain with the true sequence-to-T1ce transforms instead of
  registration (``known``): the raw path's Dice should lie within 0.01 of it, since what thick
  slices lose is not the pipeline's error.

One JSON per case and grid in ``bench/results/raw_recovery_runs/`` (a rerun skips those done),
the table in ``bench/results/raw_recovery.md|csv``.

    python bench/raw_recovery.py --data ../shared/data/real          # ~25 min on 2 cores
    python bench/raw_recovery.py --table-only
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
RUNS = RESULTS / "raw_recovery_runs"
GRIDS = ("1mm", "clinical")
REGIONS = ("WT", "TC", "ET")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def regions_of(labels: np.ndarray) -> dict[str, np.ndarray]:
    return {"WT": labels > 0, "TC": np.isin(labels, (1, 3, 4)), "ET": np.isin(labels, (3, 4))}


def raw_labels(folder: Path, case_id: str, segmenter, truth, original, known=None) -> tuple[np.ndarray, dict]:
    """The raw chain's labels carried back onto the original grid, and its ingest record."""
    import SimpleITK as sitk

    from brats_cggm.raw.grids import from_xyz, to_xyz
    from brats_cggm.raw.ingest import Ingest
    from brats_cggm.raw.native import native_regions

    case = Ingest(case_id, folder, known=known).run()
    prediction = segmenter.predict_arrays(case.arrays, case.atlas_affine, case_id)
    _, labels = native_regions(prediction, case, segmenter.threshold)
    native = from_xyz(labels.astype(np.uint8), case.reference_image)
    # original point -> moved T1ce point: the inverse of the truth (moved -> original)
    back = sitk.Resample(native, original, truth["t1ce"].transform.GetInverse(), sitk.sitkNearestNeighbor, 0)
    return to_xyz(back), case.record


def displacement(record: dict, truth, brain) -> dict[str, float]:
    """Mean displacement error (mm) of each found sequence-to-T1ce transform over the brain."""
    import SimpleITK as sitk

    from brats_cggm.raw.register import from_matrix, mean_displacement

    brain_moved = sitk.Resample(brain, truth["t1ce"].image, truth["t1ce"].transform, sitk.sitkNearestNeighbor)
    errors = {}
    for sequence in ("flair", "t1", "t2"):
        affine = from_matrix(record["registrations"][f"{sequence}_to_t1ce"]["matrix_lps"])
        true = sitk.CompositeTransform([truth[sequence].transform.GetInverse(), truth["t1ce"].transform])
        errors[sequence] = round(mean_displacement(affine, true, brain_moved), 4)
    return errors


def run_case(case, grid: str, segmenter, seed: int) -> dict:
    import SimpleITK as sitk

    from brats_cggm.data.labels import to_brats2021
    from brats_cggm.raw import simulate

    images = {m: sitk.Cast(sitk.ReadImage(str(p)), sitk.sitkFloat32) for m, p in zip(("flair", "t1", "t1ce", "t2"), case.images)}
    original = images["t1ce"]
    reference = to_brats2021(np.asarray(__import__("nibabel").load(case.label).dataobj).astype(np.uint8), case.label_scheme)
    ready = segmenter.predict_case(case).labels
    brain = sitk.Cast(original > 0, sitk.sitkUInt8)
    row = {"case": case.case_id, "grid": grid, "seed": seed}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / case.case_id
        truth = simulate.write_examination(images, folder, seed=seed,
                                           grids=simulate.ISOTROPIC if grid == "1mm" else simulate.CLINICAL)
        start = time.perf_counter()
        labels, record = raw_labels(folder, case.case_id, segmenter, truth, original)
        row["seconds"] = round(time.perf_counter() - start, 1)
        row["ingest_seconds"] = record["seconds"]
        row["displacement_mm"] = displacement(record, truth, brain)
        row["mattes_mi"] = {k: v["mattes_mi_after"] for k, v in record["registrations"].items()}
        row["rotation_deg_true"] = {m: round(float(np.degrees(2 * np.arccos(min(1.0, abs(truth[m].transform.GetVersor()[3]))))), 2)
                                    for m in truth}
        if grid == "clinical":
            known = {m: sitk.CompositeTransform([truth[m].transform.GetInverse(), truth["t1ce"].transform])
                     for m in ("flair", "t1", "t2")}
            known_labels, _ = raw_labels(folder, case.case_id, segmenter, truth, original, known)
    found, ready_r, ref_r = regions_of(labels), regions_of(ready), regions_of(reference)
    row["dice_vs_ready"] = {r: round(dice(found[r], ready_r[r]), 4) for r in REGIONS}
    row["dice_vs_reference"] = {r: round(dice(found[r], ref_r[r]), 4) for r in REGIONS}
    row["ready_dice_vs_reference"] = {r: round(dice(ready_r[r], ref_r[r]), 4) for r in REGIONS}
    if grid == "clinical":
        known_r = regions_of(known_labels)
        row["known_dice_vs_reference"] = {r: round(dice(known_r[r], ref_r[r]), 4) for r in REGIONS}
        row["dice_vs_known"] = {r: round(dice(found[r], known_r[r]), 4) for r in REGIONS}
    return row


def table(rows: list[dict]) -> str:
    header = ("| grid | cases | displacement mm (FLAIR / T1 / T2), mean [max] | raw vs BraTS-ready Dice WT / TC / ET | "
              "WT Dice vs reference: raw / BraTS-ready (raw − BraTS-ready, mean [min]) | raw − known-transform Dice vs reference WT / TC / ET, mean [min] "
              "| s per case |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for grid in GRIDS:
        chosen = [r for r in rows if r["grid"] == grid]
        if not chosen:
            continue
        disp = " / ".join(f"{np.mean([r['displacement_mm'][s] for r in chosen]):.2f} [{max(r['displacement_mm'][s] for r in chosen):.2f}]"
                          for s in ("flair", "t1", "t2"))
        vs_ready = " / ".join(f"{np.mean([r['dice_vs_ready'][g] for r in chosen]):.3f}" for g in REGIONS)
        gap = [r["dice_vs_reference"]["WT"] - r["ready_dice_vs_reference"]["WT"] for r in chosen]
        vs_ref = (f"{np.mean([r['dice_vs_reference']['WT'] for r in chosen]):.3f} / "
                  f"{np.mean([r['ready_dice_vs_reference']['WT'] for r in chosen]):.3f} ({np.mean(gap):+.3f} [{min(gap):+.3f}])")
        if grid == "clinical":
            diffs = {g: [r["dice_vs_reference"][g] - r["known_dice_vs_reference"][g] for r in chosen] for g in REGIONS}
            known = " / ".join(f"{np.mean(d):+.3f} [{min(d):+.3f}]" for d in diffs.values())
        else:
            known = "—"
        seconds = np.mean([r["seconds"] for r in chosen])
        lines.append(f"| {grid} | {len(chosen)} | {disp} | {vs_ready} | {vs_ref} | {known} | {seconds:.0f} |")
    return "\n".join(lines)


def write_tables(rows: list[dict]) -> None:
    text = ("# Raw path: known-transform recovery on the real cases\n\n`python bench/raw_recovery.py --data "
            "../shared/data/real` (see its docstring). Targets: displacement <= 1 mm for every sequence; 1 mm grids: "
            "raw vs BraTS-ready WT Dice within 0.02; clinical grids: raw within 0.01 of the known transforms.\n\n"
            + table(rows) + "\n")
    (RESULTS / "raw_recovery.md").write_text(text)
    with open(RESULTS / "raw_recovery.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "grid", "disp_flair", "disp_t1", "disp_t2", *(f"vs_ready_{g}" for g in REGIONS),
                         *(f"raw_{g}" for g in REGIONS), *(f"ready_{g}" for g in REGIONS), *(f"known_{g}" for g in REGIONS), "seconds"])
        for r in rows:
            known = r.get("known_dice_vs_reference", {})
            writer.writerow([r["case"], r["grid"], *(r["displacement_mm"][s] for s in ("flair", "t1", "t2")),
                             *(r["dice_vs_ready"][g] for g in REGIONS), *(r["dice_vs_reference"][g] for g in REGIONS),
                             *(r["ready_dice_vs_reference"][g] for g in REGIONS), *(known.get(g, "") for g in REGIONS), r["seconds"]])
    print(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent.parent / "shared" / "data" / "real")
    parser.add_argument("--grids", nargs="+", default=list(GRIDS), choices=GRIDS)
    parser.add_argument("--limit", type=int, default=None, help="only the first N cases")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    RUNS.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        from brats_cggm.data.layouts import discover
        from brats_cggm.errors import UserError
        from brats_cggm.inference.segmenter import Segmenter

        if not args.data.is_dir():
            sys.exit(f"{args.data}: no such folder (the real cases live in ../shared/data/real)")
        cases = []
        for folder in sorted(p for p in args.data.iterdir() if p.is_dir() and p.name != "partial"):
            try:
                cases += [c for c in discover(folder).cases if c.label is not None]
            except UserError as error:  # a folder without BraTS cases
                print(f"skipped {folder.name}: {error}")
        cases = cases[: args.limit]
        segmenter = Segmenter.load(None)
        for index, case in enumerate(cases):
            for grid in args.grids:
                path = RUNS / f"{case.case_id}-{grid}.json"
                if path.is_file():
                    continue
                row = run_case(case, grid, segmenter, seed=index)
                path.write_text(json.dumps(row, indent=1) + "\n")
                print(f"{case.case_id} {grid}: displacement {row['displacement_mm']}, vs ready {row['dice_vs_ready']}, "
                      f"{row['seconds']} s", flush=True)
    rows = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))]
    write_tables(rows)


if __name__ == "__main__":
    main()
