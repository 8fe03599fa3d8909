"""BraTS region metrics (:mod:`brats_cggm.metrics`, MONAI underneath) against an independent
implementation, medpy, on random nested TC/WT/ET blobs with anisotropic voxels.

Dice is the same number in both (MONAI sums in float32): they must agree to 1e-6.

HD95 is not one definition. medpy's ``hd95`` takes the 95th percentile of the *pooled*
surface distances of both directions; MONAI (hence :func:`region_metrics`), like DeepMind's
``surface_distance.compute_robust_hausdorff``, takes the *larger of the two directed* 95th
percentiles. On these masks the two definitions differ by up to ~13 mm (an isolated false
blob far from the reference moves one directed percentile a lot and the pooled one little),
so medpy's ``hd95`` cannot be compared with a tolerance. What is compared instead:

* the MONAI definition rebuilt from medpy's own surface distances
  (``medpy.metric.binary.__surface_distances``, the function its ``hd95`` calls: border =
  mask XOR its 6-connected erosion, Euclidean distance transform with the voxel spacing)
  and numpy's float64 linear percentile. Tolerance :data:`HD95_ATOL` = 1e-3 mm: MONAI keeps
  the distances in float32 (relative error 6e-8, < 3e-6 mm at 40 mm), and
  ``torch.quantile`` computes the interpolation rank ``q (n - 1)`` in float32, so for
  n <= 16k surface voxels the interpolation weight is off by up to ~1e-3 of a rank times the
  gap between neighbouring sorted distances (<= ~1 mm around the 95th percentile of these
  masks). Observed on the cases below: at most 2.4e-5 mm (see
  ``test_hd95_matches_medpy_surface_distances``).
* medpy's own ``hd95`` lies between the smaller and the larger directed percentile (a
  percentile of a pooled sample lies between the parts' percentiles, up to one rank of
  interpolation at the ends; :data:`POOLED_SLACK` allows for that).
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch
from scipy import ndimage
from training_cases import torch_threads

from brats_cggm.metrics import HD95_MISSED, REGIONS, region_metrics, summarize

binary = pytest.importorskip("medpy.metric.binary", reason="medpy (the dev extra) is the reference implementation")
surface_distances = getattr(binary, "__surface_distances")  # module-level, not name-mangled

SHAPE = (40, 48, 36)
SPACINGS = [(1.0, 1.0, 1.0), (0.9, 1.1, 2.5)]
SEEDS = [0, 1, 2, 3]
DICE_ATOL = 1e-6
HD95_ATOL = 1e-3  # mm, see the module docstring
POOLED_SLACK = 1e-3  # mm


def _field(rng: np.random.Generator, sigma: float) -> np.ndarray:
    smooth = ndimage.gaussian_filter(rng.standard_normal(SHAPE), sigma)
    return smooth / smooth.std()


def _regions(fields: list[np.ndarray], window: np.ndarray) -> np.ndarray:
    """``[3, D, H, W]`` bool in REGIONS order, nested: ET inside TC inside WT."""
    wt = fields[0] + window > -0.2
    tc = wt & (fields[1] > -0.3)
    et = tc & (fields[2] > 0.2)
    return np.stack([tc, wt, et])


def make_case(seed: int, noise: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, reference): smooth random blobs, mostly inside a central ellipsoid
    (WT 6-15k voxels of 69k), and a prediction made of the same fields plus smooth noise
    (Dice ~0.6-0.9, with the odd false blob away from the reference)."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*(np.linspace(-1, 1, s) for s in SHAPE), indexing="ij")
    window = -1.5 * sum(a**2 for a in axes)
    base = [_field(rng, 4.0) for _ in REGIONS]
    reference = _regions(base, window)
    prediction = _regions([b + noise * _field(rng, 2.0) for b in base], window)
    return prediction, reference


def directed_hd95(prediction: np.ndarray, reference: np.ndarray, spacing) -> tuple[float, float]:
    """95th percentiles (float64, linear) of medpy's surface distances, both directions."""
    forward = np.percentile(surface_distances(prediction, reference, spacing), 95)
    backward = np.percentile(surface_distances(reference, prediction, spacing), 95)
    return float(forward), float(backward)


CASES = {seed: make_case(seed) for seed in SEEDS}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """MONAI's edge and bounding-box code is a string of tiny tensor ops; with 2 OpenMP
    threads on a machine where another process is busy they ran 14x slower (1.3 s instead
    of 0.1 s per case). One thread keeps this file at a few seconds."""
    with torch_threads(1):
        yield


def test_cases_are_realistic_nested_blobs():
    for prediction, reference in CASES.values():
        for masks in (prediction, reference):
            tc, wt, et = masks
            assert not (tc & ~wt).any() and not (et & ~tc).any()
            assert 4000 < wt.sum() < 20000 and 300 < et.sum() < tc.sum()
        dice = [binary.dc(p, r) for p, r in zip(prediction, reference)]
        assert 0.5 < min(dice) and max(dice) < 0.95


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("seed", SEEDS)
def test_dice_matches_medpy(seed, spacing):
    prediction, reference = CASES[seed]
    row = region_metrics(torch.from_numpy(prediction), torch.from_numpy(reference), spacing, hd95=False)
    assert set(row) == {f"dice/{r}" for r in REGIONS}  # hd95=False: no distances
    for index, region in enumerate(REGIONS):
        assert row[f"dice/{region}"] == pytest.approx(binary.dc(prediction[index], reference[index]), abs=DICE_ATOL)


def test_hd95_matches_medpy_surface_distances():
    worst = 0.0
    for spacing in SPACINGS:
        for seed in SEEDS:
            prediction, reference = CASES[seed]
            row = region_metrics(torch.from_numpy(prediction), torch.from_numpy(reference), spacing)
            for index, region in enumerate(REGIONS):
                p, r = prediction[index], reference[index]
                forward, backward = directed_hd95(p, r, spacing)
                ours = row[f"hd95/{region}"]
                where = f"seed {seed}, spacing {spacing}, {region}"
                assert ours == pytest.approx(max(forward, backward), abs=HD95_ATOL), where
                worst = max(worst, abs(ours - max(forward, backward)))
                pooled = binary.hd95(p, r, voxelspacing=spacing)
                assert min(forward, backward) - POOLED_SLACK <= pooled <= ours + POOLED_SLACK, where
    print(f"max |region_metrics HD95 - max directed medpy HD95| = {worst:.2e} mm")


def test_hd95_follows_the_spacing_axes():
    """Spacing is per axis D, H, W: reversing an anisotropic spacing changes the result
    (so the agreement with medpy above also pins the axis order)."""
    prediction, reference = (torch.from_numpy(m) for m in CASES[0])
    forward = region_metrics(prediction, reference, (0.9, 1.1, 2.5))
    reversed_ = region_metrics(prediction, reference, (2.5, 1.1, 0.9))
    assert any(abs(forward[f"hd95/{r}"] - reversed_[f"hd95/{r}"]) > 0.1 for r in REGIONS)


def test_masks_may_be_bool_or_zero_one_numbers():
    prediction, reference = CASES[1]
    as_bool = region_metrics(torch.from_numpy(prediction), torch.from_numpy(reference), (0.9, 1.1, 2.5))
    as_float = region_metrics(torch.from_numpy(prediction).float(), torch.from_numpy(reference).to(torch.uint8),
                              (0.9, 1.1, 2.5))
    assert as_float == pytest.approx(as_bool, abs=1e-9)


# ------------------------------------------------------------ empty regions
def _with_empty(region: str, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    prediction, reference = (torch.from_numpy(m.copy()) for m in CASES[2])
    index = REGIONS.index(region)
    if where in ("both", "prediction"):
        prediction[index] = False
    if where in ("both", "reference"):
        reference[index] = False
    return prediction, reference


@pytest.mark.filterwarnings("error")  # MONAI's empty-mask warnings must not leak out
def test_region_empty_in_both_is_perfect():
    prediction, reference = _with_empty("ET", "both")
    row = region_metrics(prediction, reference, (0.9, 1.1, 2.5))
    assert row["dice/ET"] == 1.0 and row["hd95/ET"] == 0.0
    # the other regions of the same call are untouched by it
    p, r = prediction.numpy(), reference.numpy()
    assert row["dice/WT"] == pytest.approx(binary.dc(p[1], r[1]), abs=DICE_ATOL)
    assert row["hd95/WT"] == pytest.approx(max(directed_hd95(p[1], r[1], (0.9, 1.1, 2.5))), abs=HD95_ATOL)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("where", ["prediction", "reference"])
def test_region_empty_in_one_scores_the_miss_values(where):
    prediction, reference = _with_empty("TC", where)
    row = region_metrics(prediction, reference, (1.0, 1.0, 1.0))
    assert row["dice/TC"] == 0.0 and row["hd95/TC"] == HD95_MISSED == 373.13
    p, r = prediction.numpy(), reference.numpy()
    assert row["dice/ET"] == pytest.approx(binary.dc(p[2], r[2]), abs=DICE_ATOL)
    assert row["hd95/ET"] == pytest.approx(max(directed_hd95(p[2], r[2], (1.0, 1.0, 1.0))), abs=HD95_ATOL)


def test_all_regions_empty_everywhere():
    empty = torch.zeros(3, 8, 9, 10, dtype=torch.bool)
    row = region_metrics(empty, empty, (1.0, 1.0, 1.0))
    assert row == {**{f"dice/{r}": 1.0 for r in REGIONS}, **{f"hd95/{r}": 0.0 for r in REGIONS}}


def test_hd95_missed_is_the_brats_field_of_view_diagonal():
    assert HD95_MISSED == pytest.approx(float(np.sqrt(240**2 + 240**2 + 155**2)), abs=0.01)


@pytest.mark.parametrize(
    "prediction_shape, reference_shape",
    [
        ((3, 8, 8, 8), (3, 8, 8, 9)),  # spatial mismatch
        ((2, 8, 8, 8), (2, 8, 8, 8)),  # two regions, not three
        ((4, 8, 8, 8), (4, 8, 8, 8)),
        ((3, 8, 8), (3, 8, 8)),  # 2-D
        ((1, 3, 8, 8, 8), (1, 3, 8, 8, 8)),  # batched
    ],
)
def test_shape_errors(prediction_shape, reference_shape):
    with pytest.raises(ValueError, match=r"\[3, D, H, W\]"):
        region_metrics(torch.zeros(prediction_shape), torch.zeros(reference_shape), (1.0, 1.0, 1.0))


# ---------------------------------------------------------------- summarize
def test_summarize_mean_sample_std_median_and_count():
    rows = [{"dice/TC": v, "hd95/TC": 10 * v} for v in (0.2, 0.9, 0.5, 0.7, 0.4)]
    summary = summarize(rows)
    assert set(summary) == {"dice/TC", "hd95/TC"}
    for key in summary:
        values = [row[key] for row in rows]
        assert summary[key]["mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
        assert summary[key]["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)  # n - 1
        assert summary[key]["median"] == pytest.approx(statistics.median(values), abs=1e-12)
        assert summary[key]["n"] == 5


def test_summarize_one_case_and_no_cases():
    assert summarize([{"dice/WT": 0.8}]) == {"dice/WT": {"mean": 0.8, "std": 0.0, "median": 0.8, "n": 1}}
    assert summarize([]) == {}


def test_summarize_median_of_an_even_count_is_the_mean_of_the_middle_two():
    summary = summarize([{"dice/ET": v} for v in (0.1, 0.2, 0.6, 0.9)])
    assert summary["dice/ET"]["median"] == pytest.approx(statistics.median([0.1, 0.2, 0.6, 0.9]))  # 0.4
