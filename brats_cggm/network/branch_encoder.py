"""The encoder of one MRI sequence: a strided stem and a pyramid of residual units."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.blocks import Convolution, ResidualUnit
from torch import Tensor, nn

LEAKY_RELU = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


class BranchEncoder(nn.Module):
    """One branch of :class:`MultiBranchUNet`: 1 input channel, one feature map per level.

    Level 0 (the stem) is a single 3x3x3 convolution with stride ``strides[0]`` (2: the
    strided stem); level ``i > 0`` is a MONAI ``ResidualUnit`` of ``num_res_units``
    convolutions with stride ``strides[i]``. The stem is kept to one convolution because
    its grid is the largest a branch works on: four branches with two convolutions
    there cost 1.75x the time of the whole network with the one-convolution stem.

    Args:
        channels: output channels per level, e.g. ``(16, 32, 64, 128)``.
        strides: stride per level (same length).
        num_res_units: convolutions per residual unit of levels 1 and deeper.
        act, norm: MONAI activation and normalization names (with options).

    Shapes: ``[N, 1, D, H, W]`` -> list of ``[N, channels[i], D / s_i, H / s_i, W / s_i]``
    with ``s_i = prod(strides[:i + 1])``.
    """

    def __init__(
        self,
        channels: Sequence[int],
        strides: Sequence[int],
        *,
        num_res_units: int = 2,
        act: tuple | str = LEAKY_RELU,
        norm: tuple | str = "instance",
    ) -> None:
        super().__init__()
        stem = Convolution(3, 1, channels[0], strides=strides[0], act=act, norm=norm)
        self.levels = nn.ModuleList(
            [stem]
            + [
                ResidualUnit(3, c_in, c_out, strides=s, subunits=num_res_units, act=act, norm=norm)
                for c_in, c_out, s in zip(channels[:-1], channels[1:], strides[1:])
            ]
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features
