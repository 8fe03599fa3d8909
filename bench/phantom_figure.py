"""A picture of one phantom case: the four sequences and the label map on one axial slice.

    python bench/phantom_figure.py --out bench/results/phantom.png [--seed 0] [--size 240 240 155]

The slice is the one with the most tumour; images are shown in radiological convention
(patient's right on the left, anterior at the top), each with its own 0.5-99.5 %
intensity window, as a BraTS viewer would.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from brats_cggm import MODALITIES
from brats_cggm.data.phantom import DEFAULT_SIZE, generate_case
from multimodal_general.io import atomic_write

TITLES = {"flair": "FLAIR", "t1": "T1", "t1ce": "T1ce", "t2": "T2"}
#: label value -> colour (BraTS 2021: 1 NCR, 2 ED, 4 ET)
LABEL_COLOURS = {1: "tab:red", 2: "tab:green", 4: "gold"}


def axial(volume: np.ndarray, k: int) -> np.ndarray:
    """Slice ``k`` of a BraTS-oriented volume (axes -x, -y, +z of RAS), radiological view."""
    return volume[::-1, :, k].T  # rows anterior -> posterior, columns patient's right -> left


def figure(seed: int, size: tuple[int, int, int], out: Path) -> float:
    start = time.perf_counter()
    case = generate_case(seed, size)
    seconds = time.perf_counter() - start
    k = int(np.argmax((case.label > 0).sum(axis=(0, 1))))
    rows, columns = (np.flatnonzero(axial(case.tissue, k).any(axis=a)) for a in (1, 0))
    crop = (
        slice(max(rows[0] - 8, 0), rows[-1] + 9),
        slice(max(columns[0] - 8, 0), columns[-1] + 9),
    )
    aspect = case.spacing[1] / case.spacing[0]
    fig, axes = plt.subplots(1, 5, figsize=(20, 5.2), facecolor="black")
    for ax, modality in zip(axes, MODALITIES):
        image = axial(case.images[modality], k)[crop]
        high = np.percentile(image[image > 0], 99.5)
        ax.imshow(image, cmap="gray", vmin=0, vmax=high, aspect=aspect, interpolation="nearest")
        ax.set_title(TITLES[modality], color="white")
    label = axial(case.label, k)[crop]
    axes[4].imshow(
        axial(case.images["t1"], k)[crop], cmap="gray", aspect=aspect, interpolation="nearest"
    )
    colours = ListedColormap([LABEL_COLOURS[v] for v in sorted(LABEL_COLOURS)])
    index = np.select(
        [label == v for v in sorted(LABEL_COLOURS)], range(len(LABEL_COLOURS)), np.nan
    )
    axes[4].imshow(
        index,
        cmap=colours,
        vmin=0,
        vmax=len(LABEL_COLOURS) - 1,
        alpha=0.55,
        aspect=aspect,
        interpolation="nearest",
    )
    axes[4].set_title("label: NCR red, ED green, ET yellow", color="white")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"phantom seed {seed}, {'x'.join(map(str, size))}, axial slice {k}", color="white")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    atomic_write(out, lambda handle: fig.savefig(handle, format="png", dpi=90, facecolor="black"))
    plt.close(fig)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the PNG file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, nargs=3, default=DEFAULT_SIZE)
    args = parser.parse_args()
    seconds = figure(args.seed, tuple(args.size), args.out)
    print(f"wrote {args.out} (case generated in {seconds:.1f} s)")


if __name__ == "__main__":
    main()
