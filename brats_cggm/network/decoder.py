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
    unit. A last transposed convolution (kernel = stride of the first level) brings
    ``channels[0]`` features from the strided stem's grid to the input grid as
    ``out_channels`` features, for a 1x1x1 output convolution.

    That last layer is linear: no instance norm, no activation. With them (``normalized_output``,
    how networks were built before, kept so their checkpoints load as they trained) the
    tumour core and enhancing tumour outputs collapsed toward the whole tumour, on the cases
    a network trained on as on others: on four phantoms, 400 steps, the one-branch network
    reached a loss of 1.18 and predicted 1.7x the core and 2x the enhancing volume; the
    linear layer reaches 0.23 with 1.13x and 1.19x (early fusion, MONAI's UNet: 0.37, 1.07x,
    1.25x; ``tests/test_network_fit.py``).

    Args:
        channels, strides: those of the encoder branches (fused features have the same
            widths).
        out_channels: features produced on the input grid.
        act, norm: MONAI activation and normalization names (with options).
        normalized_output: norm and activation after the last layer (the old, collapsing form).

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
        normalized_output: bool = False,
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
            is_transposed=True, padding=0, output_padding=0, act=act, norm=norm, conv_only=not normalized_output,
        )

    def forward(self, fused: Sequence[Tensor]) -> Tensor:
        x = fused[-1]
        for up, block, skip in zip(self.ups, self.blocks, reversed(fused[:-1])):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.to_input(x)
