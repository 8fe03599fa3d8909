"""Do the contribution maps say what the phantoms were built to contain?

The phantom generator gives each sequence its own tissue contrasts (``CONTRAST`` in
``brats_cggm/data/phantom.py``): enhancement is visible only on T1ce, oedema is bright on
FLAIR and T2. A model that learned the phantoms should therefore lean on T1ce for the
enhancing tumour and on FLAIR/T2 for the oedema. This script predicts phantom cases that
the model never saw, with contribution maps, and measures on the *reference* tissue
voxels of each case (not the predicted ones):

* ET voxels (label 4): each sequence's share of the ET channel's positive contribution;
* ED voxels (label 2): each sequence's share of the WT channel's positive contribution;
* NCR voxels (label 1): each sequence's share of the TC channel's positive contribution;

as mean ± std over cases, plus the mean signed contribution. It also draws one case
(``contributions_<case>.png``: the four sequences on the axial slice with the most tumour,
the reference outline, and each sequence's ET and WT contribution)::

    python bench/contributions_phantoms.py                             # shipped model, 6 new phantoms, Shapley
    python bench/contributions_phantoms.py --model runs/x/model.onnx --method occlusion --cases 3
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from brats_cggm import MODALITIES  # noqa: E402
from brats_cggm.data.layouts import discover  # noqa: E402
from brats_cggm.data.phantom import write_phantoms  # noqa: E402
from brats_cggm.inference.segmenter import Segmenter  # noqa: E402
from multimodal_general.io import atomic_write_text  # noqa: E402
from multimodal_general.runs.provenance import provenance  # noqa: E402

#: tissue -> (label value in BraTS 2021 numbering, the output channel it belongs to, what the phantom shows)
TISSUES = {
    "ET": (4, 2, "enhancement: visible only on T1ce"),
    "ED": (2, 1, "oedema: bright on FLAIR and T2"),
    "NCR": (1, 0, "necrosis: dark on T1/T1ce, bright on T2"),
}


def tissue_shares(prediction, reference: np.ndarray) -> dict[str, dict[str, dict[str, float]]]:
    """Per tissue: each sequence's share of the positive contribution and its mean signed
    contribution, over the reference voxels of that tissue."""
    out = {}
    for tissue, (value, channel, _) in TISSUES.items():
        inside = reference == value
        if not inside.any():
            continue
        mass = {s: float(np.clip(m[channel][inside], 0, None).sum()) for s, m in prediction.contributions.items()}
        total = sum(mass.values())
        out[tissue] = {
            "share": {s: (v / total if total > 0 else 0.0) for s, v in mass.items()},
            "mean": {s: float(m[channel][inside].mean()) for s, m in prediction.contributions.items()},
        }
    return out


def figure(case, prediction, reference: np.ndarray, path: Path) -> None:
    z = int(np.argmax((reference > 0).sum(axis=(0, 1))))
    images = {m: nib.load(p).get_fdata()[..., z] for m, p in zip(MODALITIES, case.images)}
    fig, axes = plt.subplots(3, 4, figsize=(12, 9.4))
    limit = max(float(np.abs(m[1:, ..., z]).max()) for m in prediction.contributions.values()) or 1.0
    for col, sequence in enumerate(MODALITIES):
        axes[0, col].imshow(images[sequence].T, cmap="gray", origin="lower")
        axes[0, col].contour((reference[..., z] > 0).T, levels=[0.5], colors="yellow", linewidths=0.8)
        axes[0, col].contour((reference[..., z] == 4).T, levels=[0.5], colors="red", linewidths=0.8)
        axes[0, col].set_title(sequence.upper())
        for row, (channel, name) in enumerate(((2, "ET"), (1, "WT")), start=1):
            shown = axes[row, col].imshow(prediction.contributions[sequence][channel][..., z].T, cmap="RdBu_r",
                                          vmin=-limit, vmax=limit, origin="lower")
            axes[row, col].set_title(f"{sequence.upper()} → {name}")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=axes[1:, :].ravel().tolist(), shrink=0.8, label=f"{prediction.contribution_method} contribution to the probability")
    fig.suptitle(f"{case.case_id}, axial slice {z}: reference whole tumour (yellow) and enhancing tumour (red)")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="ONNX file or run folder (default: the shipped model)")
    parser.add_argument("--data", type=Path, default=Path("runs/phantoms_seed100"),
                        help="phantom cases (written with seed 100 when missing: cases the shipped model never saw)")
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--method", default="shapley", choices=("shapley", "occlusion"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/contributions_phantoms"))
    args = parser.parse_args()

    data = args.data
    if not data.is_dir():  # seed 100: cases the shipped model (phantom seed 0) never saw
        write_phantoms(data, args.cases, size=args.size, layout="brats2021", seed=100)
    segmenter = Segmenter.load(args.model)
    rows = []
    cases = discover(data).cases[: args.cases]
    for index, case in enumerate(cases):
        prediction = segmenter.predict_case(case, contributions=args.method)
        reference = np.asarray(nib.load(case.label).dataobj)
        rows.append({"case_id": case.case_id, "tissues": tissue_shares(prediction, reference),
                     "shares_predicted_regions": prediction.shares()})
        if index == 0:
            figure(case, prediction, reference, args.out / f"contributions_{case.case_id}.png")
        print(f"{case.case_id}: " + "; ".join(
            f"{t} " + " ".join(f"{s} {v:.2f}" for s, v in r["share"].items()) for t, r in rows[-1]["tissues"].items()))

    lines = [f"Contribution shares on reference tissue voxels ({args.method}, model {segmenter.source}, "
             f"{len(rows)} phantom case(s) from {data}); mean ± std over cases", "",
             "| tissue (channel) | what the phantom shows | " + " | ".join(MODALITIES) + " | largest |",
             "|---|---|" + "---|" * (len(MODALITIES) + 1)]
    summary = {}
    for tissue, (_, channel, shows) in TISSUES.items():
        values = {s: [r["tissues"][tissue]["share"][s] for r in rows if tissue in r["tissues"]] for s in MODALITIES}
        n = len(values[MODALITIES[0]])
        if not n:
            continue
        stats = {s: (float(np.mean(v)), float(np.std(v))) for s, v in values.items()}
        summary[tissue] = {"cases": n, "share_mean": {s: m for s, (m, _) in stats.items()},
                           "share_std": {s: sd for s, (_, sd) in stats.items()}}
        largest = max(stats, key=lambda s: stats[s][0])
        region = ("TC", "WT", "ET")[channel]
        lines.append(f"| {tissue} ({region}, {n} cases) | {shows} | "
                     + " | ".join(f"{m:.2f} ± {sd:.2f}" for m, sd in stats.values()) + f" | {largest} |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.md", f"`{' '.join(['python', 'bench/contributions_phantoms.py', *os.sys.argv[1:]])}`\n\n" + table)
    atomic_write_text(args.out / "results.json", json.dumps(
        {"provenance": provenance("monai", "onnxruntime"), "model": segmenter.source, "method": args.method,
         "summary": summary, "cases": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
