"""Can the four-branch network fit the tumour's three regions apart on the cases it trains on?

Before the fused decoder's last layer became linear, it could not: its core and enhancing
outputs collapsed toward the whole tumour (on real cases too; brats_cggm/network/decoder.py
has the figures). Here a small four-branch network trains briefly on three phantoms and must
give each region about its own volume and place it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from brats_cggm.network import build_network
from brats_cggm.training.components import RegionLoss

SIZE, CASES, STEPS = 48, 3, 150
#: bench/collapse_ablation.py, whose phantoms (z-scored images, TC/WT/ET masks) this test trains on
_spec = importlib.util.spec_from_file_location(
    "collapse_ablation", Path(__file__).resolve().parents[1] / "bench" / "collapse_ablation.py")
ablation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablation)


def fit(net: torch.nn.Module, images: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """``STEPS`` steps of the training loss on random pairs of the cases; the predicted masks."""
    torch.manual_seed(0)
    optimizer, loss = torch.optim.AdamW(net.parameters(), lr=3e-3), RegionLoss()
    for _ in range(STEPS):
        pick = torch.randint(0, len(images), (2,))
        optimizer.zero_grad()
        loss(net(images[pick]), regions[pick]).backward()
        optimizer.step()
    with torch.no_grad():
        return (net.eval()(images) > 0).float()


@pytest.mark.parametrize("fusion", ["hemis"])
def test_a_small_four_branch_network_fits_the_regions_apart(fusion):
    images, regions = ablation.phantoms(CASES, SIZE)
    torch.manual_seed(0)
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        predicted = fit(build_network("small", fusion=fusion), images, regions)
    axes = (0, 2, 3, 4)
    dice = (2 * (predicted * regions).sum(axes) / (predicted.sum(axes) + regions.sum(axes))).tolist()
    volume = (predicted.sum(axes) / regions.sum(axes)).tolist()
    # TC, WT, ET each found, none grown into the next larger one (collapsed: TC 1.7x, WT and ET 0)
    assert min(dice) > 0.5, dict(zip(("TC", "WT", "ET"), dice))
    assert all(0.6 < v < 1.6 for v in volume), dict(zip(("TC", "WT", "ET"), volume))
    oedema = (regions[:, 1] > 0) & (regions[:, 0] == 0)
    assert predicted[:, 2][oedema].mean() < 0.25  # the enhancing output stays mostly out of the oedema
