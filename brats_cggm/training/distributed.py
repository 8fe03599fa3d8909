"""The process's place in a run: one CPU process, one GPU, or one rank of ``torchrun``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from brats_cggm.errors import ConfigurationError


@dataclass(frozen=True)
class Place:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def gather(self, items: list[Any]) -> list[Any]:
        """Every rank's ``items`` concatenated, in rank order (the same list on every rank)."""
        if not self.distributed:
            return list(items)
        parts: list[list[Any]] = [[] for _ in range(self.world_size)]
        dist.all_gather_object(parts, items)
        return [item for part in parts for item in part]

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def mean_over_ranks(self, values: list[float]) -> list[float]:
        """Each value averaged over all ranks (the values themselves on one process)."""
        if not self.distributed:
            return list(values)
        return (self.all_sum(torch.tensor(values, dtype=torch.float64, device=self.device)) / self.world_size).tolist()


def start(device: str = "auto") -> Place:
    """Join the process group when ``torchrun`` started this process (NCCL on GPUs, gloo
    on CPUs) and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigurationError("device cuda was asked for, but torch sees no CUDA GPU")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    chosen = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Place(rank, world_size, chosen)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
