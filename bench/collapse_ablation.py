"""Where the four-branch network's region collapse came from: a fit check on phantoms.

Each network trains for ``--steps`` optimizer steps (AdamW 1e-3, the training loss: soft Dice
+ BCE per region, 2 of ``--cases`` phantoms per step, random mirroring) on the phantoms it is
then scored on. A network that cannot give the tumour core (TC) and the enhancing tumour (ET)
their own volumes on its own training cases has collapsed; the table says per network the
final loss (mean of the last 50 steps), the Dice per region and the predicted volume over the
reference's. One thread per network, seeded: the same command gives the same table.

Variants, each changing one thing of the four-branch network (`small` preset) or of early
fusion (MONAI's UNet at the same widths); ``single-*`` is the four-branch machinery with one
branch fed all four sequences (no fusion at all):

    python bench/collapse_ablation.py                       # every variant, ~25 min on 2 cores
    python bench/collapse_ablation.py --variants ef single-normalised single-linear
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from brats_cggm import MODALITIES
from brats_cggm.data.phantom import generate_case
from brats_cggm.network import build_network
from brats_cggm.network.branch_encoder import LEAKY_RELU
from brats_cggm.training.components import RegionLoss


class OneBranch(nn.Module):
    """The four-branch network's encoder, fusion and decoder with a single branch whose stem
    takes all four sequences: what is left of the architecture without any fusion."""

    def __init__(self, stem: Callable[[], nn.Module] | None = None, **options) -> None:
        super().__init__()
        self.net = build_network("small", modalities=("all",), **options)
        c0 = self.net.channels[0]
        self.net.branches["all"].levels[0] = (stem or (lambda: Convolution(
            3, len(MODALITIES), c0, strides=2, act=LEAKY_RELU, norm="instance")))()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(image.shape[0], 1, dtype=torch.bool)
        return self.net.decode([self.net.branches["all"](image)], keep)


class MonaiStyleDecoder(nn.Module):
    """MONAI UNet's up path on the fused pyramid: at each level cat(skip, deeper), transposed
    3x3x3 convolution (norm, activation), residual unit; the top ends normalised, as the old
    fused decoder did."""

    def __init__(self, channels, head: int) -> None:
        super().__init__()
        self.ups = nn.ModuleList()
        deeper = channels[-1]
        for width in reversed(channels[:-1]):
            self.ups.append(nn.Sequential(
                Convolution(3, deeper, width, strides=2, kernel_size=3, is_transposed=True, act=LEAKY_RELU, norm="instance"),
                ResidualUnit(3, width, width, subunits=1, act=LEAKY_RELU, norm="instance")))
            deeper = 2 * width
        self.top = nn.Sequential(
            Convolution(3, deeper, head, strides=2, kernel_size=3, is_transposed=True, act=LEAKY_RELU, norm="instance"),
            ResidualUnit(3, head, head, subunits=1, act=LEAKY_RELU, norm="instance"))

    def forward(self, fused):
        x = fused[-1]
        for up, skip in zip(self.ups, reversed(fused[:-1])):
            x = torch.cat([skip, up(x)], dim=1)
        return self.top(x)


def one_branch_monai_decoder() -> nn.Module:
    model = OneBranch(normalized_output=True)
    model.net.decoder = MonaiStyleDecoder(model.net.channels, model.net.head_channels)
    return model


def residual_stem() -> nn.Module:
    return OneBranch(lambda: ResidualUnit(3, len(MODALITIES), 8, strides=2, subunits=1, act=LEAKY_RELU,
                                          norm="instance"), normalized_output=True)


VARIANTS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "ef": ("early fusion (MONAI UNet 8-16-32-64)", lambda: build_network(
        "early_fusion", channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1)),
    "single-normalised": ("one branch, all four sequences, normalised last layer (the old decoder)",
                          lambda: OneBranch(normalized_output=True)),
    "single-monai-decoder": ("the same, MONAI-style decoder", one_branch_monai_decoder),
    "single-residual-stem": ("the same, residual stem", residual_stem),
    "single-shallow": ("the same, bottleneck at 1/8", lambda: OneBranch(strides=(2, 2, 2, 1), normalized_output=True)),
    "single-linear": ("one branch, linear last layer (the fix)", lambda: OneBranch()),
    "hemis-normalised": ("four branches, HeMIS fusion, normalised last layer",
                         lambda: build_network("small", fusion="hemis", normalized_output=True)),
    "slots-linear": ("four branches, slot fusion, linear last layer", lambda: build_network("small", fusion="slots")),
    "hemis-linear": ("four branches, HeMIS fusion, linear last layer", lambda: build_network("small", fusion="hemis")),
    "mean-linear": ("four branches, mean fusion, linear last layer", lambda: build_network("small", fusion="mean")),
}


def phantoms(cases: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (each sequence z-scored on the brain) and TC/WT/ET masks of ``cases`` phantoms."""
    def zscore(volume: np.ndarray) -> np.ndarray:
        brain, out = volume > 0, np.zeros(volume.shape, np.float32)
        out[brain] = (volume[brain] - volume[brain].mean()) / volume[brain].std()
        return out

    made = [generate_case(1000 + i, size) for i in range(cases)]
    images = np.stack([np.stack([zscore(c.images[m]) for m in MODALITIES]) for c in made])
    regions = np.stack([np.stack([np.isin(c.label, (1, 4)), c.label > 0, c.label == 4]) for c in made])
    return torch.as_tensor(images), torch.as_tensor(regions, dtype=torch.float32)


def fit_check(build: Callable[[], nn.Module], images: torch.Tensor, regions: torch.Tensor, steps: int) -> dict:
    torch.manual_seed(0)
    net = build()
    optimizer, criterion = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4), RegionLoss()
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        pick = torch.randint(0, len(images), (2,))
        x, y = images[pick], regions[pick]
        if torch.rand(()) < 0.5:
            x, y = x.flip(2), y.flip(2)
        loss = criterion(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        predicted = (net.eval()(images) > 0).float()
    axes = (0, 2, 3, 4)
    dice = 2 * (predicted * regions).sum(axes) / (predicted.sum(axes) + regions.sum(axes)).clamp_min(1)
    volume = predicted.sum(axes) / regions.sum(axes)
    return {"loss": float(np.mean(losses[-50:])), "dice": dict(zip(("TC", "WT", "ET"), dice.tolist())),
            "volume": dict(zip(("TC", "WT", "ET"), volume.tolist())), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="phantom grid (a multiple of 16)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    images, regions = phantoms(args.cases, args.size)
    print(f"{args.cases} phantoms of {args.size}^3, {args.steps} steps each (python bench/collapse_ablation.py "
          f"--steps {args.steps} --cases {args.cases} --size {args.size})\n")
    print("| network | loss | Dice TC | Dice WT | Dice ET | TC vol | WT vol | ET vol |")
    print("|---" * 8 + "|")
    results = {}
    for key in args.variants:
        label, build = VARIANTS[key]
        results[key] = found = fit_check(build, images, regions, args.steps)
        cells = [f"{found['loss']:.2f}", *(f"{found['dice'][r]:.3f}" for r in ("TC", "WT", "ET")),
                 *(f"{found['volume'][r]:.2f}" for r in ("TC", "WT", "ET"))]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    print("\n" + json.dumps(results))


if __name__ == "__main__":
    main()
