"""The few collective operations balancers need; no-ops outside torch.distributed."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_sum(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Sum ``tensor`` over ranks, in place, and return it."""
    if is_distributed(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def average_gradients(params: Iterable[torch.nn.Parameter], group=None) -> None:
    """What DDP does for modules it wraps: every rank ends with the mean gradient. A parameter
    that has a gradient on some ranks only (a head of a sequence that one rank's batch lacks)
    takes zeros on the others, so that every rank reduces the same tensors; one that has none
    anywhere keeps none (the optimizer leaves it alone)."""
    if not is_distributed(group):
        return
    params = list(params)
    if not params:
        return
    holders = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    dist.all_reduce(holders, op=dist.ReduceOp.SUM, group=group)
    for p, count in zip(params, holders.tolist()):
        if count and p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
