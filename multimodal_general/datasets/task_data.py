"""The in-memory form every general task's reader produces, whatever the format on disk.

A task's data is a :class:`TaskData`: named, ordered modalities and the splits ``train``,
``valid`` and ``test``. Each split holds, per modality, a float tensor ``[N, T_m, D_m]`` of
zero-padded sequences and a boolean mask ``[N, T_m]`` that is ``True`` on the real steps
(padded steps take no part in attention), plus the targets: class indices ``[N]`` (int64)
for classification, values ``[N, 1]`` (float32) for regression. Readers convert every
label layout to exactly these shapes, so that a loss never broadcasts ``[N]`` against
``[N, 1, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SPLITS = ("train", "valid", "test")
KINDS = ("classification", "regression")


@dataclass
class SequenceBatch:
    """What a model's ``forward`` takes: ``inputs[m]`` ``[B, T_m, D_m]``, ``masks[m]`` ``[B, T_m]``."""

    inputs: dict[str, Tensor]
    masks: dict[str, Tensor]

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(
            {m: x.to(device, non_blocking=True) for m, x in self.inputs.items()},
            {m: k.to(device, non_blocking=True) for m, k in self.masks.items()},
        )


@dataclass
class SequenceSplit:
    inputs: dict[str, Tensor]
    masks: dict[str, Tensor]
    target: Tensor
    ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.target)
        for m, x in self.inputs.items():
            mask = self.masks[m]
            if x.dim() != 3 or mask.shape != x.shape[:2] or x.shape[0] != n or mask.dtype != torch.bool:
                raise ValueError(
                    f"modality {m!r}: inputs {tuple(x.shape)} and mask {tuple(mask.shape)} "
                    f"({mask.dtype}) do not make {n} padded sequences"
                )
        if self.ids and len(self.ids) != n:
            raise ValueError(f"{len(self.ids)} ids for {n} samples")

    def __len__(self) -> int:
        return len(self.target)

    def batch(self, index: Tensor | slice) -> tuple[SequenceBatch, Tensor]:
        return (
            SequenceBatch({m: x[index] for m, x in self.inputs.items()},
                          {m: k[index] for m, k in self.masks.items()}),
            self.target[index],
        )

    def batches(self, size: int):
        """``(batch, target)`` in order, the last one possibly shorter (evaluation)."""
        for start in range(0, len(self), size):
            yield self.batch(slice(start, start + size))


@dataclass
class TaskData:
    """A task's splits and what the model needs to know about them."""

    task: str
    kind: str
    modalities: tuple[str, ...]
    splits: dict[str, SequenceSplit]
    classes: tuple[str, ...] | None = None
    source: Path | None = None
    details: dict = field(default_factory=dict)  # e.g. {"fold": 1} or {"aligned": False}

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name, split in self.splits.items():
            if tuple(split.inputs) != self.modalities:
                raise ValueError(f"split {name!r} has modalities {tuple(split.inputs)}, expected {self.modalities}")

    @property
    def out_dim(self) -> int:
        return len(self.classes) if self.kind == "classification" else 1

    @property
    def input_dims(self) -> dict[str, int]:
        split = next(iter(self.splits.values()))
        return {m: int(split.inputs[m].shape[2]) for m in self.modalities}

    def summary(self) -> dict:
        """Sizes and shapes, for run folders and ``--help``-level messages."""
        return {
            "task": self.task,
            "kind": self.kind,
            "modalities": list(self.modalities),
            "input_dims": self.input_dims,
            "classes": list(self.classes) if self.classes else None,
            "source": str(self.source) if self.source else None,
            "splits": {
                name: {"samples": len(split),
                       "max_steps": {m: int(split.inputs[m].shape[1]) for m in self.modalities}}
                for name, split in self.splits.items()
            },
            **self.details,
        }


def pad_sequences(sequences: Sequence[np.ndarray], max_steps: int | None = None) -> tuple[Tensor, Tensor]:
    """Variable-length ``[T_i, D]`` arrays -> zero-padded ``[N, T, D]`` float32 and mask ``[N, T]``.

    ``T`` is the longest sequence, or ``max_steps`` (longer sequences keep their first
    ``max_steps`` steps). A sequence of length 0 gets an all-``False`` mask row.
    """
    if not sequences:
        raise ValueError("no sequences to pad")
    dim = sequences[0].shape[1]
    longest = max(len(s) for s in sequences)
    steps = max(1, min(longest, max_steps) if max_steps else longest)
    values = torch.zeros(len(sequences), steps, dim)
    mask = torch.zeros(len(sequences), steps, dtype=torch.bool)
    for i, sequence in enumerate(sequences):
        kept = torch.as_tensor(np.asarray(sequence[:steps], dtype=np.float32))
        values[i, : len(kept)] = kept
        mask[i, : len(kept)] = True
    return values, mask


def mask_of_zero_padding(values: Tensor) -> Tensor:
    """``[N, T, D]`` -> ``[N, T]``: a step is real unless every feature of it is exactly 0
    (how the MulT-style pickles pad; they carry no lengths)."""
    return values.ne(0).any(dim=2)


def real_steps_first(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Move every sample's real steps to the front (in their order) and the padding to the
    end: left-padded data (MulT's pickles) then gets the same positions for its real steps
    whatever its padding, and keeping the first ``k`` steps keeps real ones."""
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    return (torch.gather(values, 1, order.unsqueeze(-1).expand_as(values)),
            torch.gather(mask, 1, order))
