"""The raw path against references no one here made, on ``../shared/data/{raw,dicom}``:

* ``raw/tcga_fg_6692``: four real, raw, non-co-registered sequences with BraTS-Toolkit's ANTs
  rigid transforms and HD-BET brain masks. Our sequence-to-T1ce transforms against theirs
  composed to the same pair (mean displacement over their T1ce brain mask, mm); our brain mask
  (deepbet on the T1, carried to the T1ce grid) against their HD-BET masks (Dice, HD95 mm).
* ``dicom/``: three real series (GE classic, Siemens sagittal 2-D, Siemens XA30 enhanced
  multi-frame). Geometry as read (size, spacing, origin, orientation code), the XA30 series
  against dcm2niix's reference conversion voxel for voxel in world coordinates, and brain
  extraction on each (volume, seconds).

Writes ``bench/results/raw_real.md|json``; pictures of the brain masks go to ``--out``
(default ``runs/raw_real``, never committed: they show real scans).

    python bench/raw_real.py            # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from raw_recovery import dice

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
SHARED = ROOT.parent.parent / "shared" / "data"
SEQUENCES = ("flair", "t1", "t1ce", "t2")


def hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    import torch

    from brats_cggm.metrics import surface_hd95

    return float(surface_hd95(torch.from_numpy(a[None]), torch.from_numpy(b[None]), spacing)[0])


def orientation(image) -> str:
    import SimpleITK as sitk

    return sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(image.GetDirection())


def tcga(folder: Path) -> dict:
    """Transforms and brain masks against BraTS-Toolkit's on the raw TCGA examination."""
    import SimpleITK as sitk

    from brats_cggm.raw import brain
    from brats_cggm.raw.ingest import Ingest
    from brats_cggm.raw.register import from_matrix, mean_displacement, transform_matrix

    reference = folder / "reference" / "brats_toolkit"
    start = time.perf_counter()
    ingest = Ingest(folder.name, folder, skip=["reference"])
    case = ingest.run()
    seconds = time.perf_counter() - start
    theirs = {s: sitk.ReadTransform(str(reference / "transforms" / f"{s}_to_t1_0GenericAffine.mat")) for s in ("flair", "t1ce", "t2")}
    t1ce_from_t1 = theirs["t1ce"].GetInverse()  # a T1ce point -> T1 point
    theirs_to = {"t1": t1ce_from_t1, "flair": sitk.CompositeTransform([theirs["flair"], t1ce_from_t1]),
                 "t2": sitk.CompositeTransform([theirs["t2"], t1ce_from_t1])}
    mask_t1ce = sitk.ReadImage(str(folder / "reference" / "t1ce_brainmask_native.nii.gz"))
    rows = {}
    for sequence in ("flair", "t1", "t2"):
        affine = from_matrix(case.record["registrations"][f"{sequence}_to_t1ce"]["matrix_lps"])
        difference = transform_matrix(affine) @ np.linalg.inv(transform_matrix(theirs_to[sequence]))
        angle = float(np.degrees(np.arccos(np.clip((np.trace(difference[:3, :3]) - 1) / 2, -1, 1))))
        rows[sequence] = {"displacement_mm": round(mean_displacement(affine, theirs_to[sequence], mask_t1ce), 3),
                          "rotation_difference_deg": round(angle, 3),
                          "mattes_mi": case.record["registrations"][f"{sequence}_to_t1ce"]["mattes_mi_after"]}
    # our brain mask on the native T1ce grid: deepbet on the T1, through our T1 -> T1ce transform
    t1_to_t1ce = from_matrix(case.record["registrations"]["t1_to_t1ce"]["matrix_lps"])
    t1 = sitk.Cast(sitk.ReadImage(str(folder / f"{folder.name}_t1.nii.gz")), sitk.sitkFloat32)
    mask = brain.extract(t1, "t1", space=case.reference_image, transform=t1_to_t1ce)
    on_t1ce = sitk.Resample(sitk.Cast(mask.image, sitk.sitkFloat32), case.reference_image, sitk.Transform(), sitk.sitkLinear) > 0.5
    ours_native = sitk.GetArrayFromImage(on_t1ce).astype(bool)
    # deepbet straight on the native T1 grid against HD-BET's native T1 mask (no registration involved)
    direct = brain.extract(t1, "t1")
    t1_grid = sitk.ReadImage(str(reference / "brainmask_native_t1.nii.gz"))
    direct_native = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(direct.image, sitk.sitkFloat32), t1_grid,
                                                         sitk.Transform(), sitk.sitkLinear) > 0.5).astype(bool)
    masks = {}
    spacing_t1ce = case.reference_image.GetSpacing()[::-1]  # arrays are (z, y, x)
    for name, path, ours, spacing in (
        ("t1ce_native (HD-BET, BrainLesion/preprocessing)", folder / "reference" / "t1ce_brainmask_native.nii.gz", ours_native, spacing_t1ce),
        ("t1ce_native (HD-BET on T1 carried to T1ce, BraTS-Toolkit)", reference / "brainmask_native_t1ce.nii.gz", ours_native, spacing_t1ce),
        ("t1_native, deepbet on the T1 grid directly (HD-BET, BraTS-Toolkit)", reference / "brainmask_native_t1.nii.gz", direct_native,
         t1_grid.GetSpacing()[::-1]),
    ):
        theirs_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > 0
        masks[name] = {"dice": round(dice(ours, theirs_mask), 4), "hd95_mm": round(hd95(ours, theirs_mask, spacing), 2),
                       "ours_ml": round(float(ours.sum()) * float(np.prod(spacing)) / 1000, 1),
                       "theirs_ml": round(float(theirs_mask.sum()) * float(np.prod(spacing)) / 1000, 1)}
    return {"transforms_vs_brats_toolkit": rows, "brain_masks": masks, "ingest_seconds": round(seconds, 1),
            "stages": case.record["seconds"], "brain_volume_ml": case.record["brain"]["volume_ml"]}


#: what shared/data/dicom/README.md records of each series: size, spacing, origin, orientation
DICOM_README = {
    "ge_t1_mprage": ((256, 256, 130), (0.9375, 0.9375, 1.2), (-109.305, -178.803, -77.184), "LPS"),
    "siemens_t1_sag": ((256, 256, 35), (1.015625, 1.015625, 4.8), (81.6, -130.0, 130.0), "PIR"),
    "siemens_xa30_t1_enhanced": ((128, 128, 96), (2.0, 2.0, 2.0), (-100.424, -156.094, 113.224), "PIL"),
}


def dicom_series(folder: Path, out: Path | None) -> dict:
    """Geometry, the reference comparison (where there is one) and brain extraction of one series."""
    import SimpleITK as sitk

    from brats_cggm.raw import brain
    from brats_cggm.raw.series import find_series

    series = next(s for s in find_series(folder / "series"))
    image = series.image()
    size, spacing, origin, code = DICOM_README[folder.name]
    row = {
        "files": len(series.files), "size": list(image.GetSize()), "spacing_mm": [round(v, 6) for v in image.GetSpacing()],
        "origin_mm": [round(v, 3) for v in image.GetOrigin()], "orientation": orientation(image),
        "as_readme": bool(tuple(image.GetSize()) == size and np.allclose(image.GetSpacing(), spacing, atol=1e-4)
                          and np.allclose(image.GetOrigin(), origin, atol=1e-3) and orientation(image) == code),
    }
    reference = folder / "reference.nii.gz"
    if reference.is_file():  # voxel for voxel in world coordinates: our series on the reference's grid
        ref = sitk.ReadImage(str(reference))
        ours = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkNearestNeighbor, -1.0, sitk.sitkFloat32)
        a, b = sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(sitk.Cast(ref, sitk.sitkFloat32))
        row["reference_voxels_compared"] = int(a.size)
        row["reference_voxels_different"] = int((a != b).sum())
    start = time.perf_counter()
    mask = brain.extract(image, "t1")
    row["brain_ml"] = round(mask.volume_ml, 1)
    row["brain_seconds"] = round(time.perf_counter() - start, 2)
    if out is not None:
        picture(image, mask.image, out / f"{folder.name}_brain.png", f"{folder.name}: deepbet brain mask, {mask.volume_ml:.0f} ml")
    return row


def picture(image, mask, path: Path, title: str) -> None:
    """Three orthogonal slices through the mask's centre, the mask's outline on the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    from brats_cggm.raw.grids import to_xyz

    grid = sitk.Resample(image, mask, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    values, inside = to_xyz(grid), to_xyz(mask) > 0
    centre = np.argwhere(inside).mean(axis=0).astype(int)
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for axis, cut in enumerate((np.s_[centre[0], :, :], np.s_[:, centre[1], :], np.s_[:, :, centre[2]])):
        axes[axis].imshow(values[cut].T, cmap="gray", origin="lower")
        axes[axis].contour(inside[cut].T, [0.5], colors="orange", linewidths=0.8)
        axes[axis].axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def markdown(result: dict) -> str:
    lines = ["# Raw path against outside references (real scans)", "",
             "`python bench/raw_real.py` (see its docstring).", ""]
    if "tcga" in result:
        t = result["tcga"]
        lines += ["## TCGA-FG-6692: sequence transforms against BraTS-Toolkit (ANTs rigid), composed to X -> T1ce", "",
                  "| sequence | mean displacement over their T1ce brain mask (mm) | rotation difference (deg) | our Mattes MI |",
                  "|---|---|---|---|"]
        lines += [f"| {s} | {r['displacement_mm']:.2f} | {r['rotation_difference_deg']:.2f} | {r['mattes_mi']:.3f} |"
                  for s, r in t["transforms_vs_brats_toolkit"].items()]
        lines += ["", "## TCGA-FG-6692: brain masks (ours: deepbet, shipped ONNX) against HD-BET", "",
                  "| against | Dice | HD95 (mm) | ours (ml) | theirs (ml) |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {m['dice']:.4f} | {m['hd95_mm']:.2f} | {m['ours_ml']:.0f} | {m['theirs_ml']:.0f} |"
                  for name, m in t["brain_masks"].items()]
        lines += ["", f"Ingest of the case: {t['ingest_seconds']:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in t['stages'].items())})."]
    if "dicom" in result:
        lines += ["", "## Real DICOM series", "",
                  "| series | files | size | spacing (mm) | origin (mm) | orientation | as the README | reference conversion | brain (ml) | s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in result["dicom"].items():
            ref = (f"{r['reference_voxels_different']} of {r['reference_voxels_compared']} voxels differ"
                   if "reference_voxels_compared" in r else "—")
            lines.append(f"| {name} | {r['files']} | {'x'.join(map(str, r['size']))} | {' x '.join(f'{v:g}' for v in r['spacing_mm'])} | "
                         f"{tuple(r['origin_mm'])} | {r['orientation']} | {'yes' if r['as_readme'] else 'NO'} | {ref} | "
                         f"{r['brain_ml']:.0f} | {r['brain_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--out", type=Path, default=ROOT.parent / "runs" / "raw_real", help="pictures (real scans: never commit)")
    args = parser.parse_args(argv)
    result: dict = {}
    raw = args.data / "raw" / "tcga_fg_6692"
    if raw.is_dir():
        result["tcga"] = tcga(raw)
    dicom = args.data / "dicom"
    if dicom.is_dir():
        result["dicom"] = {folder.name: dicom_series(folder, args.out) for folder in sorted(dicom.iterdir()) if folder.name in DICOM_README}
    if not result:
        raise SystemExit(f"nothing to measure: no raw/ or dicom/ under {args.data}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "raw_real.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (RESULTS / "raw_real.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
