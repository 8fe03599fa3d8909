"""Region metrics of the BraTS challenge: Dice and 95th-percentile Hausdorff distance (mm)
of TC, WT and ET, computed with MONAI, with the challenge's conventions for empty regions.

A region absent from both the reference and the prediction is a perfect result (Dice 1,
HD95 0); a region present in only one of them scores Dice 0 and HD95 :data:`HD95_MISSED`
(the diagonal of the 240 x 240 x 155 mm BraTS field of view, the value the challenge
ranks such cases with). MONAI returns NaN or infinity there instead. Their BraTS 2023
lesion-wise forms are :mod:`brats_cggm.lesion_metrics`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from torch import Tensor

REGIONS = ("TC", "WT", "ET")
#: HD95 of a region missed entirely or predicted where there is none (mm)
HD95_MISSED = 373.13


def region_metrics(
    prediction: Tensor, reference: Tensor, spacing: Sequence[float], hd95: bool = True
) -> dict[str, float]:
    """``{"dice/TC": ..., "hd95/TC": ..., ...}`` of one case.

    ``prediction`` and ``reference`` are 0/1 (or bool) region masks ``[3, D, H, W]`` in
    the order of :data:`REGIONS`; ``spacing`` is the voxel size in mm along D, H, W.
    """
    check_region_masks(prediction, reference)
    pred = prediction.detach().bool()[None].cpu()
    ref = reference.detach().bool()[None].cpu()
    pred_any, ref_any = pred.flatten(2).any(-1)[0], ref.flatten(2).any(-1)[0]
    dice = compute_dice(pred.float(), ref.float(), include_background=True, ignore_empty=False)[0]
    row = {f"dice/{r}": float(d) for r, d in zip(REGIONS, dice)}
    if hd95:
        distances = surface_hd95(pred[0], ref[0], spacing)
        for index, region in enumerate(REGIONS):
            if not (pred_any[index] and ref_any[index]):
                value = 0.0 if pred_any[index] == ref_any[index] else HD95_MISSED
            else:
                value = float(distances[index])
            row[f"hd95/{region}"] = value
    return row


def check_region_masks(prediction: Tensor, reference: Tensor) -> None:
    """Refuses masks that are not both ``[3, D, H, W]`` of one shape."""
    if prediction.shape != reference.shape or prediction.shape[0] != len(REGIONS) or prediction.dim() != 4:
        raise ValueError(
            f"region masks must both be [3, D, H, W]; got {tuple(prediction.shape)} and {tuple(reference.shape)}"
        )


def surface_hd95(prediction: Tensor, reference: Tensor, spacing: Sequence[float]) -> Tensor:
    """MONAI's 95th-percentile Hausdorff distance (mm) of each channel of 0/1 masks
    ``[C, D, H, W]``: the larger of the two directed 95th percentiles of the distances between
    the masks' edge voxels. Undefined (NaN or infinity) where a channel is empty in either."""
    with warnings.catch_warnings():  # MONAI warns about every empty mask; callers handle them
        warnings.simplefilter("ignore")
        return compute_hausdorff_distance(
            prediction[None].float(), reference[None].float(), include_background=True, percentile=95,
            spacing=[float(s) for s in spacing],
        )[0]


def summarize(rows: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation (n - 1), median and count of every metric over the cases that
    have it (a head of a sequence a case lacks has no score there)."""
    summary: dict[str, dict[str, float]] = {}
    for key in dict.fromkeys(key for row in rows for key in row):
        values = torch.tensor([row[key] for row in rows if key in row], dtype=torch.float64)
        summary[key] = {
            "mean": float(values.mean()),
            "std": float(values.std()) if len(values) > 1 else 0.0,
            "median": float(values.quantile(0.5)),
            "n": len(values),
        }
    return summary
