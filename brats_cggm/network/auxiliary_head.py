"""Training-only unimodal heads for CGGM: a light U-Net decoder over one branch's pyramid."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, UpSample
from monai.networks.layers import Conv
from torch import Tensor, nn

from brats_cggm.network.multi_branch_unet import MultiBranchUNet
from multimodal_general.balance import Modality


class AuxiliaryHead(nn.Module):
    """Segments from one branch alone: a light U-Net decoder over that branch's pyramid.

    From the bottleneck up, each level is a transposed convolution (kernel = stride) to
    ``channels[i] // width_divisor`` features, concatenation with the branch's own features
    of that level (the skip connection), and one 3x3x3 convolution; the last of them, on the
    stem's grid, is a 1x1x1 convolution to ``head_channels`` features (a 3x3x3 one there
    made four heads cost more than the whole network). A 1x1x1 :attr:`output_conv`, whose
    weight has the shape of the fused network's output convolution (as CGGM's direction
    term needs), makes the logits, which are interpolated (trilinear, no weights) to the
    input grid: the heads skip the fused decoder's full-resolution layer, which in four
    heads would cost more than the rest of them. It is the 3-D counterpart of the CGGM
    paper's per-modality decoders: without the skips a head sees only the bottleneck and
    cannot place a small region (T1 and T1ce heads then stayed at Dice 0).

    Args:
        channels, strides: the branch's widths and strides.
        out_channels, head_channels: those of the fused network.
        width_divisor: how much narrower than the fused decoder the head's levels are.
        act, norm: MONAI activation and normalization names (with options).

    Shapes: the branch pyramid, a list of ``[N, channels[i], D / s_i, ...]`` (``s_i`` the
    product of the first ``i + 1`` strides) -> ``[N, out_channels, D, H, W]``.
    """

    def __init__(
        self,
        channels: Sequence[int],
        strides: Sequence[int],
        out_channels: int,
        head_channels: int,
        *,
        width_divisor: int = 2,
        act: tuple | str,
        norm: tuple | str,
    ) -> None:
        super().__init__()
        widths = [max(c // width_divisor, 1) for c in channels]
        self.ups, self.blocks = nn.ModuleList(), nn.ModuleList()
        previous = channels[-1]
        for level in reversed(range(len(channels) - 1)):
            out = head_channels if level == 0 else widths[level]
            self.ups.append(UpSample(3, previous, widths[level], scale_factor=strides[level + 1], mode="deconv"))
            kernel = 1 if level == 0 else 3  # on the stem's grid a 3x3x3 head layer would cost as much as the network
            self.blocks.append(Convolution(3, widths[level] + channels[level], out, kernel_size=kernel, act=act, norm=norm))
            previous = out
        self.output_conv = Conv[Conv.CONV, 3](head_channels, out_channels, kernel_size=1)
        self.to_input = UpSample(3, scale_factor=strides[0], mode="nontrainable", pre_conv=None,
                                 interp_mode="trilinear", align_corners=False)

    def forward(self, pyramid: Sequence[Tensor]) -> Tensor:
        x = pyramid[-1]
        for up, block, skip in zip(self.ups, self.blocks, reversed(pyramid[:-1])):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.to_input(self.output_conv(x))


def make_auxiliary_heads(
    net: MultiBranchUNet, *, width_divisor: int = 2
) -> dict[str, tuple[AuxiliaryHead, nn.Conv3d]]:
    """One :class:`AuxiliaryHead` per branch of ``net``, as ``{name: (head, head's last
    layer)}``, on ``net``'s device. The heads are separate modules: they are not in
    ``net.state_dict()`` and never exported; a balancer owns and checkpoints them.

    Their initialisation draws from torch's random stream and then puts it back, so what the
    run draws afterwards (sequence dropout's masks) is the same with heads or without them."""
    device = net.output_conv.weight.device
    heads = {}
    with torch.random.fork_rng(devices=[]):
        for name in net.modalities:
            head = AuxiliaryHead(
                net.channels, net.strides, net.out_channels, net.head_channels,
                width_divisor=width_divisor, act=net.act, norm=net.norm,
            ).to(device)
            heads[name] = (head, head.output_conv)
    return heads


def balancer_modalities(
    net: MultiBranchUNet, heads: dict[str, tuple[nn.Module, nn.Module]] | None = None
) -> list[Modality]:
    """The registration a balancer takes: each branch with its encoder and head.

    >>> heads = make_auxiliary_heads(net)
    >>> CGGM(balancer_modalities(net, heads), fused_last_layer=net.output_conv, ...)
    """
    heads = heads or {}
    return [Modality(name, net.encoder(name), *heads.get(name, (None, None))) for name in net.modalities]
