"""Fusion of the branch features of one resolution level.

Four ways, all working with any non-empty subset of branches switched on (``keep``), and
all leaving a switched-off branch out entirely (selected away with ``torch.where``, so its
features cannot change the result, not even through a NaN):

* ``mean`` (:class:`MaskedMeanFusion`): the mean over the present branches. It forgets
  which sequence a feature came from.
* ``hemis`` (:class:`MeanVarianceFusion`): HeMIS's first and second moments over the
  present branches, mixed by a 1x1x1 convolution. The variance says where the sequences
  disagree (enhancing tumour: bright on T1ce, not on T1).
* ``attention`` (:class:`BranchAttentionFusion`): a learned per-voxel weighting of the
  present branches (softmax over the switched-on ones), in the spirit of RFNet's
  region-aware fusion: each branch scores its own features against the context of all
  present branches, so the network can lean on T1ce where it sees enhancement and on FLAIR
  where it sees oedema.
* ``slots`` (:class:`SlotFusion`): the branches' features side by side in the fixed
  sequence order, with the modality mask as extra channels (zeros in an absent branch's
  slot), mixed by a 1x1x1 convolution. Each feature keeps the sequence it came from, so a
  contrast between sequences (enhancing tumour: bright on T1ce, not on T1) is one learned
  weight away, as in early fusion; the other three pool the branches first.

Shapes: M tensors ``[N, C, *spatial]`` and ``keep [N, M]`` (bool) -> ``[N, C, *spatial]``.
A sample with every branch off gets zeros (``mean``, ``attention``) or the mix of zero
moments (``hemis``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers import Conv
from torch import Tensor, nn

from brats_cggm.errors import ConfigurationError
from brats_cggm.network.masking import as_voxel_mask

#: the logit given to a switched-off branch before the softmax (exp underflows to 0 in float32)
_OFF = -1.0e4


def _present(features: Sequence[Tensor], keep: Tensor) -> list[Tensor]:
    """Each branch's features where ``keep`` switches it on, zeros elsewhere (NaN-proof)."""
    return [torch.where(as_voxel_mask(keep[:, i]), f, 0.0) for i, f in enumerate(features)]


def _count(features: Sequence[Tensor], keep: Tensor) -> Tensor:
    """How many branches are on per sample (at least 1), shaped to broadcast over voxels."""
    return as_voxel_mask(keep.sum(dim=1).clamp_min(1).to(features[0].dtype))


def masked_mean(features: Sequence[Tensor], keep: Tensor) -> Tensor:
    """Mean over the branches ``keep`` keeps, per sample (zeros where none is on)."""
    return sum(_present(features, keep)) / _count(features, keep)


def masked_moments(features: Sequence[Tensor], keep: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (population) variance over the branches ``keep`` keeps, per sample."""
    mean = masked_mean(features, keep)
    spread = _present([f - mean for f in features], keep)
    return mean, sum(s * s for s in spread) / _count(features, keep)


class MaskedMeanFusion(nn.Module):
    """Mean of the branch features over the branches that are switched on, per sample.

    ``sum_i keep_i * f_i / max(sum_i keep_i, 1)``; the mean keeps its scale whatever the
    number of branches (which is what lets the network run with a sequence missing, once
    trained with sequence dropout).
    """

    def forward(self, features: Sequence[Tensor], keep: Tensor) -> Tensor:
        return masked_mean(features, keep)


class MeanVarianceFusion(nn.Module):
    """HeMIS fusion: ``conv1x1([mean, variance])`` over the present branches.

    Args:
        channels: features per branch (C); the output has C too.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mix = Conv[Conv.CONV, 3](2 * channels, channels, kernel_size=1)

    def forward(self, features: Sequence[Tensor], keep: Tensor) -> Tensor:
        return self.mix(torch.cat(masked_moments(features, keep), dim=1))


class BranchAttentionFusion(nn.Module):
    """Per-voxel softmax weights over the present branches, ``sum_i w_i f_i``.

    Branch i's logit is a 1x1x1 convolution of its own features next to the mean of all
    present branches (``[f_i, mean]``): one scorer per branch, so the weights know which
    sequence they weigh. Switched-off branches get weight 0.

    Args:
        channels: features per branch (C).
        branches: number of branches (M).
    """

    def __init__(self, channels: int, branches: int) -> None:
        super().__init__()
        self.scores = nn.ModuleList(
            Conv[Conv.CONV, 3](2 * channels, 1, kernel_size=1) for _ in range(branches)
        )

    def weights(self, features: Sequence[Tensor], keep: Tensor) -> Tensor:
        """``[N, M, *spatial]``: each present branch's weight per voxel (0 for the others)."""
        mean = masked_mean(features, keep)
        logits = torch.cat(
            [score(torch.cat([f, mean], dim=1)) for score, f in zip(self.scores, features)], dim=1
        )
        on = keep[:, :, None, None, None]
        return torch.softmax(torch.where(on, logits.float(), _OFF), dim=1).to(mean.dtype) * on

    def forward(self, features: Sequence[Tensor], keep: Tensor) -> Tensor:
        weights = self.weights(features, keep)
        return sum(f * weights[:, i : i + 1] for i, f in enumerate(_present(features, keep)))


class SlotFusion(nn.Module):
    """``conv1x1([keep_1 f_1, ..., keep_M f_M, keep])``: every branch in its own slot.

    The mask channels (constant per sample) let the mixing tell "absent" from "dark": an
    absent branch's slot is zero and its mask channel says why.

    Args:
        channels: features per branch (C); the output has C too.
        branches: number of branches (M).
    """

    def __init__(self, channels: int, branches: int) -> None:
        super().__init__()
        self.mix = Conv[Conv.CONV, 3](branches * (channels + 1), channels, kernel_size=1)

    def forward(self, features: Sequence[Tensor], keep: Tensor) -> Tensor:
        present = _present(features, keep)
        mask = keep.to(present[0].dtype)[:, :, None, None, None].expand(-1, -1, *present[0].shape[2:])
        return self.mix(torch.cat([*present, mask], dim=1))


#: the fusion names the network takes (``MultiBranchUNet(fusion=...)``)
FUSIONS = ("mean", "hemis", "attention", "slots")


def make_fusion(name: str, channels: int, branches: int) -> nn.Module:
    """The fusion module ``name`` for one level of ``branches`` branches of ``channels`` features."""
    if name == "mean":
        return MaskedMeanFusion()
    if name == "hemis":
        return MeanVarianceFusion(channels)
    if name == "attention":
        return BranchAttentionFusion(channels, branches)
    if name == "slots":
        return SlotFusion(channels, branches)
    raise ConfigurationError(f"unknown fusion '{name}'; choose one of {', '.join(FUSIONS)}")
