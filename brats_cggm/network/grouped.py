"""Several branch encoders of the same shape run as one grouped network.

The branches keep their own modules and parameters (so a balancer still finds each
sequence's encoder, and checkpoints are those of separate branches); only the execution is
shared: at every convolution the branches' weights are concatenated and applied in one
grouped call (``groups`` = number of branches), with the branches' channels side by side in
branch order. Per-channel layers (instance norm without running statistics, activations,
dropout) act on the concatenated channels exactly as on each branch's own. Gradients reach
each branch's parameters through the concatenation.

:func:`grouped_forward` walks the branches' modules in lockstep and knows the layers a
:class:`~brats_cggm.network.branch_encoder.BranchEncoder` is built from (MONAI's
``Convolution`` and ``ResidualUnit``); anything else is a clear error rather than a silent
difference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import ResidualUnit
from torch import Tensor, nn

from brats_cggm.errors import ConfigurationError

#: layers that act on each channel alone, with no state of their own
_PER_CHANNEL = (nn.Identity, nn.LeakyReLU, nn.ReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Dropout, nn.Dropout3d)


def grouped_forward(modules: Sequence[nn.Module], x: Tensor) -> Tensor:
    """``[N, M * C_in, ...]`` (branch ``i``'s channels in block ``i``) -> ``[N, M * C_out, ...]``:
    what each of the ``M`` same-shaped ``modules`` computes on its own block, in one pass."""
    first = modules[0]
    if any(type(m) is not type(first) for m in modules):
        raise ConfigurationError("grouped branches must be built alike; got " +
                                 ", ".join(type(m).__name__ for m in modules))
    if isinstance(first, nn.Conv3d):
        return _grouped_conv(modules, x)
    if isinstance(first, ResidualUnit):
        residual = grouped_forward([m.residual for m in modules], x)
        return grouped_forward([m.conv for m in modules], x) + residual
    if isinstance(first, nn.Sequential):  # MONAI's Convolution and ADN are Sequentials
        for layers in zip(*(list(m.children()) for m in modules), strict=True):
            x = grouped_forward(layers, x)
        return x
    if isinstance(first, _PER_CHANNEL):
        return first(x)
    if isinstance(first, nn.InstanceNorm3d) and not first.affine and not first.track_running_stats:
        return F.instance_norm(x, eps=first.eps)  # per channel: the module would warn about its width
    raise ConfigurationError(f"grouped branches cannot run a {type(first).__name__} layer")


def _grouped_conv(convs: Sequence[nn.Conv3d], x: Tensor) -> Tensor:
    first = convs[0]
    if first.padding_mode != "zeros" or any(
        (c.stride, c.padding, c.dilation, c.groups, c.bias is None)
        != (first.stride, first.padding, first.dilation, first.groups, first.bias is None)
        for c in convs
    ):
        raise ConfigurationError("grouped branches need convolutions of one shape (stride, padding, bias)")
    weight = torch.cat([c.weight for c in convs])
    bias = None if first.bias is None else torch.cat([c.bias for c in convs])
    return F.conv3d(x, weight, bias, first.stride, first.padding, first.dilation, first.groups * len(convs))


def split_branches(features: Tensor, branches: int) -> list[Tensor]:
    """``[N, M * C, ...]`` -> ``M`` views ``[N, C, ...]`` (branch order)."""
    return list(features.chunk(branches, dim=1))
