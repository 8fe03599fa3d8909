"""Early-fusion baseline: one MONAI U-Net over the four sequences stacked as channels."""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.networks.nets import UNet
from torch import Tensor, nn

from brats_cggm import MODALITIES
from brats_cggm.errors import ConfigurationError
from brats_cggm.network.branch_encoder import LEAKY_RELU
from brats_cggm.network.masking import check_image, sequence_dropout, resolve_mask


class EarlyFusionUNet(nn.Module):
    """MONAI ``UNet`` taking all sequences as input channels, with the forward signature
    of :class:`MultiBranchUNet`, for comparison.

    Early fusion has no branch to remove: ``modality_mask`` (and sequence dropout) only
    sets the switched-off channels to zero, which the network sees as an input like any
    other. It has no per-sequence encoder, so balancers that act on encoders (CGGM)
    cannot be registered on it; :meth:`forward_with_features` returns no features.

    Args:
        modalities: sequence names, in the order of the image channels.
        out_channels: region logits (3: TC, WT, ET).
        channels, strides: MONAI ``UNet`` widths and strides (``len(channels) - 1``
            strides; the first level is strided). Spatial sizes must be divisible by
            ``prod(strides)``.
        num_res_units: residual units per level.
        sequence_dropout: probability of zeroing a sequence per sample in training.
        act, norm: MONAI activation and normalization names (with options).

    Shapes: ``image [N, M, D, H, W]``, ``modality_mask [N, M]`` -> ``[N, out_channels, D, H, W]``.
    """

    def __init__(
        self,
        modalities: Sequence[str] = MODALITIES,
        out_channels: int = 3,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2),
        *,
        num_res_units: int = 2,
        sequence_dropout: float = 0.0,
        act: tuple | str = LEAKY_RELU,
        norm: tuple | str = "instance",
    ) -> None:
        super().__init__()
        if len(strides) != len(channels) - 1:
            raise ConfigurationError(
                f"MONAI UNet takes len(channels) - 1 strides; got {len(channels)} channels "
                f"and {len(strides)} strides"
            )
        if not 0.0 <= sequence_dropout < 1.0:
            raise ConfigurationError(f"sequence_dropout must be in [0, 1); got {sequence_dropout}")
        self.modalities = tuple(modalities)
        self.out_channels = out_channels
        self.channels, self.strides = tuple(channels), tuple(strides)
        self.sequence_dropout = float(sequence_dropout)
        self.unet = UNet(3, len(self.modalities), out_channels, channels, strides,
                         num_res_units=num_res_units, act=act, norm=norm)

    @property
    def divisor(self) -> int:
        return math.prod(self.strides)

    def forward(self, image: Tensor, modality_mask: Tensor | None = None) -> Tensor:
        check_image(image, self.modalities, self.divisor)
        keep = resolve_mask(modality_mask, image)
        if self.training and self.sequence_dropout > 0:
            keep = sequence_dropout(keep, self.sequence_dropout)
        return self.unet(image.masked_fill(~keep[:, :, None, None, None], 0.0))

    def forward_with_features(
        self, image: Tensor, modality_mask: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return self.forward(image, modality_mask), {}
