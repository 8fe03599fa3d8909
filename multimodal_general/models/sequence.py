"""The model of the sequence tasks (Food-101, CMU-MOSI, IEMOCAP): a transformer encoder per
modality over its padded feature sequence, masked mean pooling, late fusion.

Per modality: LayerNorm of the input features, a linear projection to ``d_model``, sinusoidal
positions, ``layers`` pre-norm transformer encoder layers in which padded steps are masked
out of attention (``src_key_padding_mask``), a final LayerNorm and the mean over the real
steps. A sample with no real step in a modality (a missing modality) attends to its first,
all-zero step, so that attention never runs over an empty set.

The unimodal heads CGGM needs (:func:`~multimodal_general.models.late_fusion.attach_balancer`)
read the pooled features: two linear layers. The paper's heads for these tasks are 1-2
self-attention layers over each modality's sequence; ours see the pooled vector only, which
keeps the balancer contract of one feature tensor per modality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from multimodal_general.datasets.task_data import SequenceBatch
from multimodal_general.models.late_fusion import LateFusion


def sinusoidal_positions(steps: int, dim: int, device=None) -> Tensor:
    """``[steps, dim]`` sine/cosine positions of "Attention is all you need"."""
    position = torch.arange(steps, device=device, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(steps, dim, device=device)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


class SequenceEncoder(nn.Module):
    """Padded sequences ``[N, T, D]`` with masks ``[N, T]`` (``True`` = real) -> ``[N, d_model]``."""

    def __init__(self, input_dim: int, d_model: int = 64, layers: int = 2, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.input_norm = nn.LayerNorm(input_dim)
        self.project = nn.Linear(input_dim, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=2 * d_model, dropout=dropout, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.output_norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        mask = mask.clone()
        mask[~mask.any(dim=1), 0] = True  # a sample without any real step attends to step 0
        h = self.project(self.input_norm(x.float()))  # inputs may be stored in float16
        h = h + sinusoidal_positions(h.shape[1], h.shape[2], h.device)
        h = self.output_norm(self.layers(h, src_key_padding_mask=~mask))
        weights = mask.unsqueeze(-1).to(h.dtype)
        return (h * weights).sum(dim=1) / weights.sum(dim=1)


@dataclass(frozen=True)
class ModelSize:
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1


class SequenceFusionNet(LateFusion):
    """One :class:`SequenceEncoder` per modality, concatenation and a fused head; ``forward``
    takes a :class:`~multimodal_general.datasets.task_data.SequenceBatch`."""

    def __init__(self, input_dims: dict[str, int], out_dim: int, size: ModelSize = ModelSize(),
                 fusion_head: str = "mlp"):
        encoders = {
            name: SequenceEncoder(dim, size.d_model, size.layers, size.heads, size.dropout)
            for name, dim in input_dims.items()
        }
        super().__init__(encoders, size.d_model, out_dim, fusion_head, dropout=size.dropout)

    def encode(self, batch: SequenceBatch) -> dict[str, Tensor]:
        return {name: encoder(batch.inputs[name], batch.masks[name]) for name, encoder in self.encoders.items()}


class ShapeCheckedLoss(nn.Module):
    """A loss that refuses an output and a target of different shapes instead of letting
    them broadcast (``[N, 1]`` against ``[N]`` gives an ``[N, N]`` loss that still trains)."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        if output.shape != target.shape:
            raise ValueError(f"output {tuple(output.shape)} and target {tuple(target.shape)} differ in shape")
        return self.loss(output, target)


def task_criterion(kind: str) -> nn.Module:
    """Cross-entropy for classification; L1 for regression (MulT's loss on CMU-MOSI), shape-checked."""
    return nn.CrossEntropyLoss() if kind == "classification" else ShapeCheckedLoss(nn.L1Loss())
