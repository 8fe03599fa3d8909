"""How close are the phantoms to real BraTS scans? The same statistics, measured on phantoms
and on real labelled cases, side by side in one run::

    python bench/phantom_vs_real.py                     # 12 phantoms at 1 mm vs brats2018
    python bench/phantom_vs_real.py --cases 6 --size 96x128x80 --real DIR --out /tmp/pvr

Phantoms: cases ``case_seed(--seed, i)`` of :func:`generate_case` (the cases that
``write_phantoms`` writes), measured in memory. Real: every
``<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` under ``--real`` (BraTS 2018-2021 names;
labels 1 NCR, 2 oedema, 4 ET; default ``../shared/data/real/brats2018``). Without such cases
the script says so in one line and exits 2: the real cases are not part of the project.

Intensities are z-scored per sequence over that sequence's brain (its non-zero voxels), as
the training pipeline normalises them, so that scanners' arbitrary scales drop out. Per case:

* **key gaps** and **contrast**: the median of a tissue minus the median of the normal brain
  (brain voxels outside the label map, non-zero in all four sequences), per sequence. Tissues:
  ET, NCR, oedema (ED) from the label map, and CSF, which BraTS does not label: the normal
  voxels brightest on T2 (above its 95th percentile), found the same way in both sets. The
  key gaps: ET on T1ce minus ET on T1 (what enhancement adds), oedema on FLAIR, CSF on T2
  minus CSF on FLAIR.
* **ratio to WM**: a tissue's median over white matter's, in raw intensities: the
  generator's own units (its ``CONTRAST`` table), which z-scores cannot pin down (they hide
  any affine change of the intensities). White matter: normal voxels in the top 30 % on T1,
  less their surface.
* **spread**: the interquartile range of the normal brain per sequence, of ET on T1ce and of
  oedema on FLAIR (tumour heterogeneity); white matter's robust standard deviation over its
  median (its texture, noise and bias together).
* **noise**: the robust standard deviation (1.4826 MAD) of the differences of neighbouring
  white-matter voxels, over sqrt(2): voxel noise in brain standard deviations, plus what
  texture varies from one voxel to the next.
* **bias**: white matter's intensity averaged over ~4 mm blocks and smoothed with a 15 mm
  Gaussian (normalised convolution, white matter only), its standard deviation: the slow
  variation a bias field adds.
* **geometry**: brain and whole-tumour volumes (ml), TC/WT and ET/TC volume ratios, the
  enhancing rim's thickness (2 x ET volume / ET surface, mm: a shell's thickness), how much
  of the shell just outside the tumour core is still tumour (1: oedema wraps the core), and
  the 26-connected parts of the whole tumour (all of them, and those of at least 0.5 ml).

Each is summarised as the mean and the case-to-case standard deviation (a case without ET
has no ET numbers). *off* is (phantom mean - real mean) / real standard deviation: within
+-1 the phantoms sit inside the real cases' spread. The table goes to stdout (rich) and to
``--out``.md; everything, per case too, to ``--out``.json (both written atomically). Only
these derived numbers are written: no image data of a real case.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
from rich.console import Console
from rich.table import Table
from scipy import ndimage

from brats_cggm import MODALITIES
from brats_cggm.data.phantom import case_seed, generate_case, grid_size
from multimodal_general.io import atomic_write_text, json_safe
from multimodal_general.runs.provenance import provenance

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL = REPO.parent / "shared" / "data" / "real" / "brats2018"
DEFAULT_OUT = REPO / "bench" / "results" / "phantom_vs_real"
NCR, ED, ET = 1, 2, 4
TISSUES = ("ET", "NCR", "ED", "CSF")
CSF_PERCENTILE = 95  # of normal-brain T2: the brightest normal voxels on T2 are CSF
WM_PERCENTILE = 70  # of normal-brain T1: the brightest normal voxels on T1 are white matter
BIAS_BLOCK_MM, BIAS_SIGMA_MM = 4.0, 15.0
#: a loader returns one case's (images by sequence, label map, voxel spacing in mm)
Loader = Callable[[], tuple[dict[str, np.ndarray], np.ndarray, tuple[float, float, float]]]


def _sections() -> dict[str, dict[str, str]]:
    """The table's sections: statistic key -> its name, in the order of the table."""
    per_sequence = {
        "contrast (z, tissue median - normal median)": {
            f"contrast/{t}/{m}": f"{t} on {m}" for t in TISSUES for m in MODALITIES
        },
        "ratio to WM (raw intensities)": {
            f"ratio/{t}/{m}": f"{t} / WM on {m}" for t in (*TISSUES, "normal") for m in MODALITIES
        },
    }
    spread = {f"spread/normal/{m}": f"normal brain IQR, {m}" for m in MODALITIES}
    spread["spread/ET/t1ce"] = "ET IQR, t1ce"
    spread["spread/ED/flair"] = "ED IQR, flair"
    spread.update({f"spread/wm/{m}": f"WM robust sd / median, {m}" for m in MODALITIES})
    return {
        "key gaps (z)": {
            "gap/et_t1ce_minus_t1": "ET: T1ce minus T1",
            "gap/ed_flair": "ED on FLAIR",
            "gap/csf_t2_minus_flair": "CSF: T2 minus FLAIR",
        },
        **per_sequence,
        "spread": spread,
        "noise and bias (z)": {
            **{f"noise/{m}": f"noise in WM, {m}" for m in MODALITIES},
            **{f"bias/{m}": f"bias (smooth WM sd), {m}" for m in MODALITIES},
        },
        "geometry": {
            "geometry/brain_ml": "brain volume (ml)",
            "geometry/wt_ml": "WT volume (ml)",
            "geometry/tc_over_wt": "TC / WT",
            "geometry/et_over_tc": "ET / TC",
            "geometry/et_rim_mm": "ET rim thickness (mm)",
            "geometry/tc_wrapped": "TC's outer shell in WT",
            "geometry/wt_parts": "WT parts (all)",
            "geometry/wt_parts_0.5ml": "WT parts >= 0.5 ml",
        },
    }


SECTIONS = _sections()
MEASURES = {key: name for section in SECTIONS.values() for key, name in section.items()}


# --- measuring one case -------------------------------------------------------------------


def measure_case(
    images: dict[str, np.ndarray], label: np.ndarray, spacing: tuple[float, float, float]
) -> dict[str, float]:
    """Every statistic of :data:`MEASURES` for one case (NaN where a tissue is absent)."""
    z = {m: _zscore(images[m]) for m in MODALITIES}
    brain = np.all([images[m] > 0 for m in MODALITIES], axis=0)
    normal = (label == 0) & brain
    wm = _white_matter(z["t1"], normal)
    tissues = _tissue_masks(z, label, normal)
    values = _contrasts(z, tissues, normal)
    values.update(_ratios(images, {**tissues, "normal": normal}, wm))
    values.update(_spreads(images, z, label, normal, wm))
    values.update({f"noise/{m}": _neighbour_noise(z[m], wm) for m in MODALITIES})
    values.update({f"bias/{m}": _bias(z[m], wm, spacing) for m in MODALITIES})
    values.update(_geometry(label, brain, spacing))
    return values


def _zscore(image: np.ndarray) -> np.ndarray:
    """The image in standard deviations of its brain (non-zero voxels) from the brain's mean."""
    brain = image[image > 0].astype(np.float64)
    return ((image - brain.mean()) / brain.std()).astype(np.float32)


def _median(values: np.ndarray) -> float:
    return float(np.median(values)) if values.size else math.nan


def _iqr(values: np.ndarray) -> float:
    if not values.size:
        return math.nan
    low, high = np.percentile(values, [25, 75])
    return float(high - low)


def _robust_sd(values: np.ndarray) -> float:
    """The standard deviation of a normal distribution with these 10th-90th percentiles:
    blind to the few outliers (vessels, partial volumes) that a plain one would weigh."""
    low, high = np.percentile(values, [10, 90])
    return float(high - low) / 2.563


def _white_matter(t1: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Normal voxels in the top 30 % on T1 (white matter is the brightest tissue there), less
    their surface, so that a voxel's neighbours are white matter too (no partial volume)."""
    bright = normal & (t1 > np.percentile(t1[normal], WM_PERCENTILE))
    return ndimage.binary_erosion(bright)


def _tissue_masks(
    z: dict[str, np.ndarray], label: np.ndarray, normal: np.ndarray
) -> dict[str, np.ndarray]:
    """ET, NCR, oedema from the label map; CSF as the normal voxels brightest on T2."""
    csf = normal & (z["t2"] > np.percentile(z["t2"][normal], CSF_PERCENTILE))
    return {"ET": label == ET, "NCR": label == NCR, "ED": label == ED, "CSF": csf}


def _contrasts(
    z: dict[str, np.ndarray], tissues: dict[str, np.ndarray], normal: np.ndarray
) -> dict[str, float]:
    """Each tissue's median minus the normal brain's, per sequence, and the key gaps: relative
    to the normal brain, so that a sequence's z offset (set by how much tumour and CSF its
    brain holds) drops out."""
    baseline = {m: _median(z[m][normal]) for m in MODALITIES}
    values = {
        f"contrast/{tissue}/{m}": _median(z[m][mask]) - baseline[m]
        for tissue, mask in tissues.items()
        for m in MODALITIES
    }
    values["gap/et_t1ce_minus_t1"] = values["contrast/ET/t1ce"] - values["contrast/ET/t1"]
    values["gap/ed_flair"] = values["contrast/ED/flair"]
    values["gap/csf_t2_minus_flair"] = values["contrast/CSF/t2"] - values["contrast/CSF/flair"]
    return values


def _ratios(
    images: dict[str, np.ndarray], tissues: dict[str, np.ndarray], wm: np.ndarray
) -> dict[str, float]:
    """Each tissue's median over white matter's, per sequence (raw intensities)."""
    values = {}
    for m in MODALITIES:
        reference = _median(images[m][wm])
        for tissue, mask in tissues.items():
            values[f"ratio/{tissue}/{m}"] = _median(images[m][mask]) / reference
    return values


def _spreads(
    images: dict[str, np.ndarray],
    z: dict[str, np.ndarray],
    label: np.ndarray,
    normal: np.ndarray,
    wm: np.ndarray,
) -> dict[str, float]:
    """Interquartile ranges (z) of the normal brain, ET and oedema; white matter's spread."""
    values = {f"spread/normal/{m}": _iqr(z[m][normal]) for m in MODALITIES}
    values["spread/ET/t1ce"] = _iqr(z["t1ce"][label == ET])
    values["spread/ED/flair"] = _iqr(z["flair"][label == ED])
    for m in MODALITIES:
        values[f"spread/wm/{m}"] = _robust_sd(images[m][wm]) / _median(images[m][wm])
    return values


def _neighbour_noise(z: np.ndarray, wm: np.ndarray) -> float:
    """Robust standard deviation of the differences of white-matter neighbours along the
    three axes, over sqrt(2) (a difference of two independent noises has twice the variance);
    the median absolute deviation ignores the few pairs that straddle a real edge."""
    differences = []
    for axis in range(3):
        ahead, behind = [slice(None)] * 3, [slice(None)] * 3
        ahead[axis], behind[axis] = slice(1, None), slice(None, -1)
        both = wm[tuple(ahead)] & wm[tuple(behind)]
        differences.append(z[tuple(ahead)][both] - z[tuple(behind)][both])
    d = np.concatenate(differences)
    if not d.size:
        return math.nan
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2))


def _block_mean(volume: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Means over blocks of ``factors`` voxels (edges that do not fill a block dropped)."""
    shape = np.array(volume.shape) // factors
    cropped = volume[tuple(slice(0, n * f) for n, f in zip(shape, factors))]
    blocks = cropped.reshape(shape[0], factors[0], shape[1], factors[1], shape[2], factors[2])
    return blocks.mean(axis=(1, 3, 5))


def _bias(z: np.ndarray, wm: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Standard deviation of white matter's smoothed intensity: noise and texture average
    out over 15 mm, what is left varies slowly (a bias field, or large-scale changes of the
    tissue). On ~4 mm blocks: smoothing a 1 mm grid over 15 mm would take seconds."""
    factors = np.maximum(1, np.round(BIAS_BLOCK_MM / np.asarray(spacing)).astype(int))
    weight = _block_mean(wm.astype(np.float32), factors)
    total = _block_mean(np.where(wm, z, 0).astype(np.float32), factors)
    sigma = BIAS_SIGMA_MM / (factors * np.asarray(spacing))
    smooth = ndimage.gaussian_filter(total, sigma)
    smooth /= np.maximum(ndimage.gaussian_filter(weight, sigma), 1e-6)
    inside = weight > 0.5
    return float(smooth[inside].std()) if inside.any() else math.nan


def _surface_mm2(mask: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Area of the voxel faces between ``mask`` and the rest, in mm^2."""
    area = 0.0
    for axis in range(3):
        padded = np.pad(mask, [(1, 1) if a == axis else (0, 0) for a in range(3)])
        faces = np.count_nonzero(np.diff(padded.astype(np.int8), axis=axis))
        area += faces * np.prod([s for a, s in enumerate(spacing) if a != axis])
    return float(area)


def _geometry(
    label: np.ndarray, brain: np.ndarray, spacing: tuple[float, float, float]
) -> dict[str, float]:
    """Volumes, their ratios, the enhancing rim's thickness and the parts of the tumour."""
    ml = float(np.prod(spacing)) / 1000
    regions = ((NCR, ED, ET), (NCR, ET), (ET,))
    wt, tc, et = (np.count_nonzero(np.isin(label, values)) * ml for values in regions)
    core = np.isin(label, (NCR, ET))
    shell = ndimage.binary_dilation(core) & ~core
    parts, count = ndimage.label(label > 0, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(parts.ravel())[1:] * ml
    return {
        "geometry/brain_ml": np.count_nonzero(brain) * ml,
        "geometry/wt_ml": wt,
        "geometry/tc_over_wt": tc / wt if wt else math.nan,
        "geometry/et_over_tc": et / tc if tc else math.nan,
        "geometry/et_rim_mm": 2000 * et / _surface_mm2(label == ET, spacing) if et else math.nan,
        "geometry/tc_wrapped": float(np.mean(label[shell] > 0)) if shell.any() else math.nan,
        "geometry/wt_parts": float(count),
        "geometry/wt_parts_0.5ml": float(np.count_nonzero(sizes >= 0.5)),
    }


# --- the two sets of cases ------------------------------------------------------------------


def phantom_cases(count: int, size: np.ndarray, seed: int) -> Iterator[tuple[str, Loader]]:
    """(id, loader) of each phantom."""
    for index in range(count):

        def load(index: int = index):
            case = generate_case(case_seed(seed, index), size)
            return case.images, case.label, case.spacing

        yield f"phantom_{index:02d}", load


def real_cases(root: Path) -> Iterator[tuple[str, Loader]]:
    """(id, loader) of each labelled case in a folder of BraTS 2018-2021 cases."""
    for folder in sorted(p for p in root.iterdir() if (p / f"{p.name}_seg.nii.gz").is_file()):

        def load(folder: Path = folder):
            images = {m: _read(folder / f"{folder.name}_{m}.nii.gz") for m in MODALITIES}
            label_image = nib.load(folder / f"{folder.name}_seg.nii.gz")
            label = np.asarray(label_image.dataobj).astype(np.uint8)
            return images, label, tuple(float(s) for s in label_image.header.get_zooms()[:3])

        yield folder.name, load


def _read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj).astype(np.float32)


def measure_all(
    cases: Iterator[tuple[str, Loader]], say: Callable[[str], None]
) -> dict[str, dict[str, float]]:
    """Case id -> its statistics, one case in memory at a time (a 1 mm case is ~0.2 GB)."""
    measured = {}
    for case_id, load in cases:
        start = time.perf_counter()
        measured[case_id] = measure_case(*load())
        say(f"{case_id}: {time.perf_counter() - start:.1f} s")
    return measured


def summarise(measured: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per statistic: mean, case-to-case standard deviation (ddof 1), cases that have it."""
    summary = {}
    for key in MEASURES:
        values = np.array([case[key] for case in measured.values()], float)
        values = values[np.isfinite(values)]
        summary[key] = {
            "mean": float(values.mean()) if values.size else math.nan,
            "std": float(values.std(ddof=1)) if values.size > 1 else math.nan,
            "n": int(values.size),
        }
    return summary


# --- reporting ------------------------------------------------------------------------------


def _cell(stats: dict[str, float]) -> str:
    return f"{stats['mean']:.2f} ± {stats['std']:.2f}" if math.isfinite(stats["mean"]) else "-"


def _off(phantom: dict[str, float], real: dict[str, float]) -> str:
    if not (math.isfinite(phantom["mean"]) and math.isfinite(real["mean"]) and real["std"] > 0):
        return "-"
    return f"{(phantom['mean'] - real['mean']) / real['std']:+.1f}"


def rows(summary: dict[str, dict]) -> dict[str, list[tuple[str, str, str, str]]]:
    """Section -> its rows (statistic, phantom, real, off)."""
    phantom, real = summary["phantom"], summary["real"]
    return {
        section: [
            (name, _cell(phantom[k]), _cell(real[k]), _off(phantom[k], real[k]))
            for k, name in keys.items()
        ]
        for section, keys in SECTIONS.items()
    }


def markdown(sections: dict[str, list[tuple[str, ...]]], title: str, command: str) -> str:
    lines = [f"# {title}", "", f"`{command}`", ""]
    lines += ["| statistic | phantom | real | off |", "|---|---|---|---|"]
    for section, section_rows in sections.items():
        lines.append(f"| **{section}** | | | |")
        lines += [f"| {' | '.join(row)} |" for row in section_rows]
    return "\n".join(lines) + "\n"


def rich_table(sections: dict[str, list[tuple[str, ...]]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("statistic")
    for column in ("phantom mean ± sd", "real mean ± sd", "off (real sd)"):
        table.add_column(column, justify="right")
    for section, section_rows in sections.items():
        table.add_row(f"[bold]{section}[/bold]")
        for row in section_rows:
            table.add_row(*row)
        table.add_section()
    return table


def write_results(out: Path, title: str, command: str, sections: dict, payload: dict) -> None:
    payload = {"provenance": provenance("numpy", "scipy", "nibabel"), **payload}
    atomic_write_text(out.parent / f"{out.name}.md", markdown(sections, title, command))
    text = json.dumps(json_safe(payload), indent=1) + "\n"
    atomic_write_text(out.parent / f"{out.name}.json", text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--real", type=Path, default=DEFAULT_REAL,
        help="labelled BraTS 2018-2021 cases (default ../shared/data/real/brats2018)")
    add("--cases", type=int, default=12, help="phantom cases (default 12)")
    add("--size", default="240x240x155", help="phantom grid (default 240x240x155: 1 mm)")
    add("--seed", type=int, default=0, help="phantom set seed, as write_phantoms's (default 0)")
    add("--out", type=Path, default=DEFAULT_OUT,
        help="output stem: STEM.md and STEM.json (default bench/results/phantom_vs_real)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.real.is_dir() or not any(real_cases(args.real)):
        print(f"phantom_vs_real: no labelled real cases in {args.real} (real BraTS data is not "
              "part of the project: see ../shared/data/real/README.md, or pass --real DIR)",
              file=sys.stderr)
        return 2
    console = Console()
    size = grid_size(args.size)
    measured = {
        "phantom": measure_all(phantom_cases(args.cases, size, args.seed), console.log),
        "real": measure_all(real_cases(args.real), console.log),
    }
    summary = {name: summarise(cases) for name, cases in measured.items()}
    sections = rows(summary)
    grid = "x".join(map(str, size))
    title = (f"{len(measured['phantom'])} phantoms ({grid}, seed {args.seed}) vs "
             f"{len(measured['real'])} real cases ({args.real.name})")
    console.print(rich_table(sections, title))
    words = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python bench/phantom_vs_real.py", *words])
    settings = {"cases": args.cases, "size": size.tolist(), "seed": args.seed}
    settings["real"] = args.real.name
    payload = {"settings": settings, "measures": MEASURES, "summary": summary, "cases": measured}
    write_results(args.out, title, command, sections, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
