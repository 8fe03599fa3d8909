"""BraTS 2023 lesion-wise Dice and HD95 (:mod:`brats_cggm.lesion_metrics`) on hand-made
masks whose answers are known: cubes of a 32 x 32 x 32 grid, one region at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brats_cggm.lesion_metrics import HD95_UNMATCHED, lesion_metrics, region_lesion_scores
from brats_cggm.metrics import REGIONS, region_metrics

SHAPE = (32, 32, 32)
ISO = (1.0, 1.0, 1.0)
HALF = (0.5, HD95_UNMATCHED / 2)  # one perfect lesion beside one unmatched term


def cubes(*corners_and_sizes: tuple[tuple[int, int, int], int]) -> np.ndarray:
    """A bool mask holding a cube of edge ``size`` at each ``corner``."""
    mask = np.zeros(SHAPE, bool)
    for (z, y, x), size in corners_and_sizes:
        mask[z:z + size, y:y + size, x:x + size] = True
    return mask


BIG = ((4, 4, 4), 6)  # 216 voxels
FAR_BIG = ((22, 22, 22), 5)  # 125 voxels, far from BIG
FAR_SMALL = ((24, 24, 24), 3)  # 27 voxels: under the 50 mm³ threshold at 1 mm


def test_one_perfect_lesion():
    assert region_lesion_scores(cubes(BIG), cubes(BIG), ISO) == (1.0, 0.0)


def test_a_missed_lesion_under_the_threshold_is_ignored():
    assert region_lesion_scores(cubes(BIG), cubes(BIG, FAR_SMALL), ISO) == (1.0, 0.0)


def test_a_missed_big_lesion_scores_zero():
    assert region_lesion_scores(np.zeros(SHAPE, bool), cubes(FAR_BIG), ISO) == (0.0, HD95_UNMATCHED)


def test_two_reference_lesions_one_matched():
    assert region_lesion_scores(cubes(BIG), cubes(BIG, FAR_BIG), ISO) == pytest.approx(HALF)


@pytest.mark.parametrize("island", [FAR_BIG, ((26, 26, 26), 2)], ids=["big", "8 voxels"])
def test_a_false_positive_island_far_away_halves_a_perfect_case(island):
    """An unmatched predicted component counts whatever its size."""
    assert region_lesion_scores(cubes(BIG, island), cubes(BIG), ISO) == pytest.approx(HALF)


def test_a_prediction_within_the_dilation_matches():
    """A component 2 voxels away (3 steps of the dilation) matches: no overlap, so Dice 0,
    and its HD95 is the classic one; 3 voxels away it is a miss plus a false positive."""
    reference = cubes(BIG)
    near, far = cubes(((12, 4, 4), 6)), cubes(((13, 4, 4), 6))
    dice, hd95 = region_lesion_scores(near, reference, ISO)
    classic = region_metrics(*(torch.from_numpy(np.stack([m] * 3)) for m in (near, reference)), ISO)
    assert dice == 0.0 and hd95 == pytest.approx(classic["hd95/TC"]) and 0 < hd95 < 20
    assert region_lesion_scores(far, reference, ISO) == (0.0, HD95_UNMATCHED)


def test_a_shifted_prediction_scores_its_overlap():
    shifted = cubes(((6, 4, 4), 6))  # 2 voxels along D: 4 of 6 slices overlap
    dice, hd95 = region_lesion_scores(shifted, cubes(BIG), ISO)
    assert dice == pytest.approx(2 / 3) and hd95 == pytest.approx(2.0)


@pytest.mark.parametrize("gap", [2, 6])
def test_reference_components_whose_dilations_touch_are_one_lesion(gap):
    """A small missed component up to 6 voxels from a perfectly predicted big one is part of
    its lesion: it lowers that lesion's Dice instead of being ignored."""
    reference = cubes(BIG, ((10 + gap, 4, 4), 3))
    dice, _ = region_lesion_scores(cubes(BIG), reference, ISO)
    assert dice == pytest.approx(2 * 216 / (216 + 216 + 27))


def test_a_reference_component_further_away_is_a_lesion_of_its_own():
    assert region_lesion_scores(cubes(BIG), cubes(BIG, ((17, 4, 4), 3)), ISO) == (1.0, 0.0)  # 7 voxels: ignored


def test_empty_reference_and_prediction_is_perfect():
    empty = np.zeros(SHAPE, bool)
    assert region_lesion_scores(empty, empty, ISO) == (1.0, 0.0)
    assert region_lesion_scores(empty, cubes(FAR_SMALL), ISO) == (1.0, 0.0)  # nothing left to score
    assert region_lesion_scores(cubes(FAR_SMALL), empty, ISO) == (0.0, HD95_UNMATCHED)


def test_anisotropic_spacing_sets_the_threshold_volume_and_the_distances():
    """64 voxels of 0.5 x 0.5 x 1 mm (16 mm³) are under the threshold; at 1 mm they are not."""
    reference = cubes(BIG, ((22, 22, 22), 4))
    anisotropic = (0.5, 0.5, 1.0)
    assert region_lesion_scores(cubes(BIG), reference, anisotropic) == (1.0, 0.0)
    assert region_lesion_scores(cubes(BIG), reference, ISO) == pytest.approx(HALF)
    shifted = cubes(((4, 4, 6), 6))  # 2 voxels along W, 1 mm each here
    assert region_lesion_scores(shifted, cubes(BIG), anisotropic)[1] == pytest.approx(2.0)


def test_lesion_metrics_scores_each_region_in_order():
    reference = torch.from_numpy(np.stack([cubes(BIG), cubes(BIG, FAR_BIG), cubes(BIG)]))
    prediction = torch.from_numpy(np.stack([cubes(BIG), cubes(BIG), np.zeros(SHAPE, bool)]))
    row = lesion_metrics(prediction, reference, ISO)
    assert list(row) == [f"lesion_{m}/{r}" for m in ("dice", "hd95") for r in REGIONS]
    assert [row[f"lesion_dice/{r}"] for r in REGIONS] == pytest.approx([1.0, 0.5, 0.0])
    assert [row[f"lesion_hd95/{r}"] for r in REGIONS] == pytest.approx([0.0, HD95_UNMATCHED / 2, HD95_UNMATCHED])


def test_lesion_metrics_refuses_masks_that_are_not_three_regions():
    with pytest.raises(ValueError, match=r"\[3, D, H, W\]"):
        lesion_metrics(torch.zeros(2, 8, 8, 8), torch.zeros(2, 8, 8, 8), ISO)
