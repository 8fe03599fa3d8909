"""Checks of the network input and the per-sample modality mask, and sequence dropout.

A modality mask is ``[N, M]`` (one row per sample, one column per modality in the
network's order): true / non-zero switches a branch on, false / zero switches it off.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from brats_cggm.errors import ConfigurationError


def check_image(image: Tensor, modalities: Sequence[str], divisor: int) -> None:
    """``image`` must be ``[N, M, D, H, W]`` with every spatial size divisible by ``divisor``
    (the product of the network's strides)."""
    if image.dim() != 5 or image.shape[1] != len(modalities):
        raise ConfigurationError(
            f"the network takes an image [N, {len(modalities)}, D, H, W] with channels "
            f"{', '.join(modalities)}; got shape {tuple(image.shape)}"
        )
    divisors = (divisor,) * 3
    spatial = tuple(image.shape[2:])
    if any(size % d for size, d in zip(spatial, divisors)):
        raise ConfigurationError(
            f"spatial size {spatial} is not divisible by {divisors} (the product of the "
            "network's strides per axis): pad or crop the patch, e.g. to a multiple of "
            f"{divisor}"
        )


def resolve_mask(modality_mask: Tensor | None, image: Tensor) -> Tensor:
    """The mask as a bool tensor ``[N, M]`` on the image's device (all true for ``None``)."""
    n, m = image.shape[:2]
    if modality_mask is None:
        return torch.ones(n, m, dtype=torch.bool, device=image.device)
    if tuple(modality_mask.shape) != (n, m):
        raise ConfigurationError(
            f"modality_mask must have shape [N, M] = [{n}, {m}] (one row per sample, one "
            f"column per sequence); got {tuple(modality_mask.shape)}"
        )
    return modality_mask.to(device=image.device) != 0


def sequence_dropout(available: Tensor, p: float) -> Tensor:
    """Switch off each available branch with probability ``p``, but never all of a sample's:
    a sample that would lose every branch keeps one available branch chosen at random."""
    keep = available & (torch.rand(available.shape, device=available.device) >= p)
    scores = torch.rand(available.shape, device=available.device).masked_fill(~available, -1.0)
    rescue = torch.nn.functional.one_hot(scores.argmax(dim=1), available.shape[1]).bool()
    return keep | (rescue & available & ~keep.any(dim=1, keepdim=True))


def as_voxel_mask(mask_column: Tensor) -> Tensor:
    """A ``[N]`` column of the mask, shaped to broadcast over ``[N, C, D, H, W]``."""
    return mask_column.view(-1, 1, 1, 1, 1)
