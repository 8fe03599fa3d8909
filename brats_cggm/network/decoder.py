"""The shared decoder of :class:`MultiBranchUNet`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, ResidualUnit, UpSample
from torch import Tensor, nn


class FusedDecoder(nn.Module):
    """U-Net decoder over the fused feature pyramid, back to the input grid.

    From the deepest fused level up: a transposed convolution (kernel = stride) to the
    next level's width, concatenation with that level's fused features, one residual
    unit. A last transposed convolution (kernel = stride of the first level, with norm
    and activation) brings ``channels[0]`` features from the strided stem's grid to the
    input grid as ``out_channels`` features, for a 1x1x1 output convolution.

    Args:
        channels, strides: those of the encoder branches (fused features have the same
            widths).
        out_channels: features produced on the input grid.
        act, norm: MONAI activation and normalization names (with options).

    Shapes: list of ``[N, channels[i], *spatial_i]`` -> ``[N, out_channels, D, H, W]``.
    """

    def __init__(
        self,
        channels: Sequence[int],
        strides: Sequence[int],
        out_channels: int,
        *,
        act: tuple | str,
        norm: tuple | str,
    ) -> None:
        super().__init__()
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for level in reversed(range(len(channels) - 1)):
            self.ups.append(
                UpSample(3, channels[level + 1], channels[level],
                         scale_factor=strides[level + 1], mode="deconv")
            )
            self.blocks.append(
                ResidualUnit(3, 2 * channels[level], channels[level], subunits=1, act=act, norm=norm)
            )
        self.to_input = Convolution(
            3, channels[0], out_channels, strides=strides[0], kernel_size=strides[0],
            is_transposed=True, padding=0, output_padding=0, act=act, norm=norm,
        )

    def forward(self, fused: Sequence[Tensor]) -> Tensor:
        x = fused[-1]
        for up, block, skip in zip(self.ups, self.blocks, reversed(fused[:-1])):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.to_input(x)
