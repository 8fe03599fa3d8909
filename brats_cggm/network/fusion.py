"""Fusion of the branch features of one resolution level."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from brats_cggm.network.masking import as_voxel_mask


class MaskedMeanFusion(nn.Module):
    """Mean of the branch features over the branches that are switched on, per sample.

    ``sum_i keep_i * f_i / max(sum_i keep_i, 1)``, with the switched-off terms selected
    away (``torch.where``), so a switched-off branch adds nothing, not even a NaN, and
    the mean keeps its scale whatever the number of branches (which is what lets the
    network run with a sequence missing, once trained with modality dropout). A sample
    with every branch off gets zeros.

    Shapes: M tensors ``[N, C, *spatial]`` and ``keep [N, M]`` (bool) -> ``[N, C, *spatial]``.
    """

    def forward(self, features: Sequence[Tensor], keep: Tensor) -> Tensor:
        total = torch.zeros_like(features[0])
        for index, feature in enumerate(features):
            total = total + torch.where(as_voxel_mask(keep[:, index]), feature, 0.0)
        count = keep.sum(dim=1).clamp_min(1).to(total.dtype)
        return total / as_voxel_mask(count)
