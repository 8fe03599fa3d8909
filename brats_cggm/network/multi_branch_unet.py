"""Multi-branch 3-D U-Net: one encoder per MRI sequence, fused at every level."""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.networks.layers import Conv
from torch import Tensor, nn

from brats_cggm import MODALITIES
from brats_cggm.errors import ConfigurationError
from brats_cggm.network.branch_encoder import LEAKY_RELU, BranchEncoder
from brats_cggm.network.decoder import FusedDecoder
from brats_cggm.network.fusion import make_fusion
from brats_cggm.network.grouped import grouped_forward, split_branches
from brats_cggm.network.masking import (
    as_voxel_mask,
    check_image,
    sequence_dropout,
    resolve_mask,
)


class MultiBranchUNet(nn.Module):
    """One :class:`BranchEncoder` per sequence, a fusion per level, one shared decoder.

    Each branch sees one input channel. At every resolution level the features of the
    branches that are switched on are fused (``fusion``: a masked mean, HeMIS mean and
    variance, per-voxel attention over the branches, or the branches side by side in their
    slots with the mask; :mod:`brats_cggm.network.fusion`);
    the fused pyramid feeds a U-Net decoder (:class:`FusedDecoder`) and a 1x1x1 convolution
    (:attr:`output_conv`) gives one logit per region (TC, WT, ET; apply a sigmoid).

    A branch switched off by ``modality_mask`` gets a zero input and is left out of
    every fusion: its input cannot change the output. With ``sequence_dropout > 0`` the
    network switches branches off at random in training (never all branches of a
    sample), so that it learns to segment with a sequence missing. A sample with every
    branch switched off gets the prediction of an all-zero fused pyramid.

    Args:
        modalities: sequence names, in the order of the image channels.
        out_channels: region logits (3: TC, WT, ET).
        channels: branch (and decoder) width per level, e.g. ``(16, 32, 64, 128)``.
        strides: stride per level, same length; a first stride of 2 is the strided stem.
            Spatial input sizes must be divisible by ``prod(strides)`` (:attr:`divisor`:
            16 for four strides of 2, e.g. 64^3, 128^3 or 96x128x80), and in training the
            deepest grid needs more than one voxel (instance norm).
        num_res_units: convolutions per residual unit of the branch levels below the stem.
        head_channels: features on the input grid that the output convolution reads.
        sequence_dropout: probability of switching a branch off per sample in training.
        fusion: ``mean``, ``hemis``, ``attention`` or ``slots`` (one module per level;
            :mod:`brats_cggm.network.fusion`).
        act, norm: MONAI activation and normalization names (with options).
        normalized_output: the decoder's last layer normalised, as networks were built before
            (their checkpoints; regions collapse, see :class:`FusedDecoder`).
        grouped: run the branches as one grouped network (one convolution call per layer for
            all branches, :mod:`brats_cggm.network.grouped`): the same function and the same
            parameters as running them one by one, in fewer, larger calls. Off by default: on 2 CPU
            cores a training step took 1.02x (0.99-1.09) as long (``bench/training_speed.py``,
            64^3, ``bench/results/training_speed_64.md``); it is there for GPUs.

    Shapes: ``image [N, M, D, H, W]``, ``modality_mask [N, M]`` (bool or 0/1, optional)
    -> logits ``[N, out_channels, D, H, W]``.
    """

    def __init__(
        self,
        modalities: Sequence[str] = MODALITIES,
        out_channels: int = 3,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2, 2),
        *,
        num_res_units: int = 2,
        head_channels: int = 16,
        sequence_dropout: float = 0.0,
        fusion: str = "mean",
        act: tuple | str = LEAKY_RELU,
        norm: tuple | str = "instance",
        normalized_output: bool = False,
        grouped: bool = False,
    ) -> None:
        super().__init__()
        if len(modalities) < 1 or len(set(modalities)) != len(modalities):
            raise ConfigurationError(f"modalities must be unique names; got {list(modalities)}")
        if len(channels) < 2 or len(channels) != len(strides):
            raise ConfigurationError(
                f"channels and strides need one entry per level (at least 2 levels); got "
                f"{len(channels)} channels and {len(strides)} strides"
            )
        if min(channels) < 1 or min(strides) < 1 or head_channels < 1:
            raise ConfigurationError("channels, strides and head_channels must be positive")
        if not 0.0 <= sequence_dropout < 1.0:
            raise ConfigurationError(f"sequence_dropout must be in [0, 1); got {sequence_dropout}")
        self.modalities = tuple(modalities)
        self.out_channels, self.head_channels = out_channels, head_channels
        self.channels, self.strides = tuple(channels), tuple(strides)
        self.sequence_dropout = float(sequence_dropout)
        self.fusion_name = fusion
        self.grouped = bool(grouped)
        self.act, self.norm = act, norm
        self.branches = nn.ModuleDict(
            {name: BranchEncoder(channels, strides, num_res_units=num_res_units, act=act, norm=norm)
             for name in self.modalities}
        )
        self.fusions = nn.ModuleList(make_fusion(fusion, c, len(self.modalities)) for c in channels)
        self.decoder = FusedDecoder(channels, strides, head_channels, act=act, norm=norm,
                                    normalized_output=normalized_output)
        self.output_conv = Conv[Conv.CONV, 3](head_channels, out_channels, kernel_size=1)

    @property
    def divisor(self) -> int:
        """Every spatial input size must be a multiple of this."""
        return math.prod(self.strides)

    def encoder(self, name: str) -> nn.Module:
        """The branch of sequence ``name`` (what a balancer registers as its encoder)."""
        if name not in self.branches:
            raise ConfigurationError(
                f"no branch named '{name}'; the branches are {list(self.modalities)}"
            )
        return self.branches[name]

    def forward(self, image: Tensor, modality_mask: Tensor | None = None) -> Tensor:
        return self.forward_with_features(image, modality_mask)[0]

    def forward_with_features(
        self, image: Tensor, modality_mask: Tensor | None = None
    ) -> tuple[Tensor, dict[str, list[Tensor]]]:
        """Logits and, per sequence, its branch's feature pyramid (a list of
        ``[N, channels[i], ...]`` from the stem's grid down; with its graph; what the CGGM
        heads read, detached). Sequence dropout removes a branch from the fusion only: its
        features are still those of its real input."""
        logits, branch_features = self.forward_with_pyramids(image, modality_mask)
        return logits, self.features_by_name(branch_features)

    def forward_with_pyramids(
        self, image: Tensor, modality_mask: Tensor | None = None
    ) -> tuple[Tensor, list[list[Tensor]]]:
        """Logits and every branch's whole feature pyramid (what :meth:`decode` reads; AGM
        decodes them again with one sequence switched on)."""
        available = resolve_mask(modality_mask, image)
        branch_features = self.encode(image, available)
        keep = available
        if self.training and self.sequence_dropout > 0:
            keep = sequence_dropout(available, self.sequence_dropout)
        return self.decode(branch_features, keep), branch_features

    def features_by_name(self, branch_features: Sequence[Sequence[Tensor]]) -> dict[str, list[Tensor]]:
        """``{sequence: its branch's pyramid}`` from the branch pyramids in branch order."""
        return {name: list(levels) for name, levels in zip(self.modalities, branch_features)}

    def encode(self, image: Tensor, available: Tensor) -> list[list[Tensor]]:
        """Every branch's feature pyramid; an unavailable branch of a sample sees zeros.

        ``available`` is a bool ``[N, M]`` mask. Together with :meth:`decode` this lets a
        caller encode once and decode under several masks (e.g. contribution maps).
        """
        check_image(image, self.modalities, self.divisor)
        if not self.grouped:
            return [
                self.branches[name](
                    image[:, index : index + 1].masked_fill(~as_voxel_mask(available[:, index]), 0.0)
                )
                for index, name in enumerate(self.modalities)
            ]
        x = image.masked_fill(~available[:, :, None, None, None], 0.0)
        levels = []
        for layers in zip(*(self.branches[name].levels for name in self.modalities)):
            x = grouped_forward(layers, x)
            levels.append(split_branches(x, len(self.modalities)))
        return [list(pyramid) for pyramid in zip(*levels)]

    def decode(self, branch_features: Sequence[Sequence[Tensor]], keep: Tensor) -> Tensor:
        """Logits from the branch pyramids, fusing only the branches ``keep [N, M]`` keeps."""
        return self.output_conv(self.decoder(self.fuse(branch_features, keep)))

    def fuse(self, branch_features: Sequence[Sequence[Tensor]], keep: Tensor) -> list[Tensor]:
        """The fused pyramid: each level's branch features fused over the branches ``keep`` keeps."""
        return [fusion(level, keep) for fusion, level in zip(self.fusions, zip(*branch_features))]
