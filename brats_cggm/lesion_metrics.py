"""BraTS 2023 lesion-wise Dice and 95th-percentile Hausdorff distance (mm) of TC, WT and ET,
the challenge's ranking metrics: each lesion counts, so a missed small lesion or a false
island far from the tumour costs as much as a poorly outlined big one.

Conventions, those of the BraTS 2023 glioma evaluation (dilation 3, threshold 50):

- Components are 26-connected. The reference's *lesions* are the components of the
  reference dilated :data:`DILATION` times (by the 18-neighbour cross), each restricted to
  the reference voxels: reference components whose dilations touch (up to 6 voxels
  apart) are one lesion.
- A predicted component *matches* a lesion when it overlaps the lesion's dilation. A lesion
  scores the Dice and HD95 between itself and the union of its matched components; a
  lesion with none (a false negative) scores Dice 0 and HD95 :data:`HD95_UNMATCHED`, and so
  does every predicted component that matches no lesion (a false positive, of any size).
- Lesions of :data:`MIN_LESION_MM3` or less (50 voxels at BraTS' 1 mm) are left out, with
  what they matched (which is no false positive).
- A case's value is the mean over its kept lesions and its false positives; with neither
  (both masks empty, or only left-out lesions unmatched), Dice 1 and HD95 0.
- HD95 is :func:`brats_cggm.metrics.surface_hd95` (MONAI's, the classic metric's: the
  larger of the two directed 95th percentiles). The challenge's 2023 code takes the same
  maximum over DeepMind's surface elements weighted by area, which can differ by a fraction
  of a millimetre; panoptica (the later ``brats-evaluation`` package) pools both directions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from brats_cggm.inference.components import bounding_box
from brats_cggm.metrics import REGIONS, check_region_masks, surface_hd95

#: dilations (voxels) of a reference lesion that a predicted component must touch to match it
DILATION = 3
#: reference lesions of this volume (mm³) or less are not scored
MIN_LESION_MM3 = 50.0
#: HD95 of an unmatched lesion or predicted component (mm)
HD95_UNMATCHED = 374.0

_STEP = ndimage.generate_binary_structure(3, 2)
_CONNECTED = ndimage.generate_binary_structure(3, 3)


class Components(NamedTuple):
    """Labelled components: ``ids`` (0 outside, 1..n) and each one's bounding box."""

    ids: np.ndarray
    boxes: list[tuple[slice, ...]]

    @classmethod
    def of(cls, mask: np.ndarray, dilations: int = 0) -> Components:
        """The components of ``mask`` dilated ``dilations`` times, found in its bounding box
        grown by the dilations (a whole-image search costs more than the rest)."""
        ids = np.zeros(mask.shape, np.int32)
        if not mask.any():
            return cls(ids, [])
        box = _grown([bounding_box(mask)], dilations, mask.shape)
        inside = ndimage.binary_dilation(mask[box], _STEP, dilations) if dilations else mask[box]
        ids[box], _ = ndimage.label(inside, _CONNECTED)
        return cls(ids, [tuple(slice(s.start + b.start, s.stop + b.start) for s, b in zip(found, box))
                         for found in ndimage.find_objects(ids[box])])


def lesion_metrics(prediction: Tensor, reference: Tensor, spacing: Sequence[float]) -> dict[str, float]:
    """``{"lesion_dice/TC": ..., ..., "lesion_hd95/TC": ..., ...}`` of one case; the masks
    and ``spacing`` as for :func:`brats_cggm.metrics.region_metrics`."""
    check_region_masks(prediction, reference)
    pred, ref = prediction.detach().bool().cpu().numpy(), reference.detach().bool().cpu().numpy()
    scores = [region_lesion_scores(p, r, spacing) for p, r in zip(pred, ref)]
    return {
        **{f"lesion_dice/{region}": dice for region, (dice, _) in zip(REGIONS, scores)},
        **{f"lesion_hd95/{region}": hd95 for region, (_, hd95) in zip(REGIONS, scores)},
    }


def region_lesion_scores(
    prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]
) -> tuple[float, float]:
    """Lesion-wise ``(Dice, HD95)`` of one region's boolean masks ``[D, H, W]``."""
    # each component of the dilated reference is the dilation of the lesion it holds
    lesions, found = Components.of(reference, DILATION), Components.of(prediction)
    overlap = (lesions.ids > 0) & (found.ids > 0)
    matches = np.zeros((len(lesions.boxes) + 1, len(found.boxes) + 1), bool)  # [lesion, component]
    matches[lesions.ids[overlap], found.ids[overlap]] = True
    volumes = np.bincount(lesions.ids[reference], minlength=len(lesions.boxes) + 1) * float(np.prod(spacing))
    kept = [k for k in range(1, len(lesions.boxes) + 1) if volumes[k] > MIN_LESION_MM3]
    false_positives = len(found.boxes) - np.count_nonzero(matches[:, 1:].any(0))
    scores = [_lesion_scores(k, np.flatnonzero(matches[k]), lesions, reference, found, spacing) for k in kept]
    count = len(kept) + false_positives
    if count == 0:
        return 1.0, 0.0
    dice = sum(d for d, _ in scores) / count
    hd95 = (sum(h for _, h in scores) + false_positives * HD95_UNMATCHED) / count
    return float(dice), float(hd95)


def _lesion_scores(
    lesion: int, matched: np.ndarray, lesions: Components, reference: np.ndarray, found: Components,
    spacing: Sequence[float],
) -> tuple[float, float]:
    """``(Dice, HD95)`` of ``lesion`` against the union of its ``matched`` components."""
    if len(matched) == 0:
        return 0.0, HD95_UNMATCHED
    box = _grown([lesions.boxes[lesion - 1], *(found.boxes[j - 1] for j in matched)], 1, reference.shape)
    truth = (lesions.ids[box] == lesion) & reference[box]
    guess = np.isin(found.ids[box], matched)
    dice = 2.0 * np.count_nonzero(truth & guess) / (np.count_nonzero(truth) + np.count_nonzero(guess))
    hd95 = surface_hd95(torch.from_numpy(guess)[None], torch.from_numpy(truth)[None], spacing)[0]
    return dice, float(hd95)


def _grown(boxes: Sequence[tuple[slice, ...]], margin: int, shape: Sequence[int]) -> tuple[slice, ...]:
    """The box around ``boxes``, grown by ``margin`` voxels and clipped to ``shape``."""
    return tuple(
        slice(max(min(b[axis].start for b in boxes) - margin, 0),
              min(max(b[axis].stop for b in boxes) + margin, size))
        for axis, size in enumerate(shape)
    )
