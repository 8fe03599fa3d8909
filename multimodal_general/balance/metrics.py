"""Utilization metrics: how well a unimodal head does on the current batch.

A metric maps ``(prediction, target)`` to one score per sample (a tensor of shape
``[N]``, larger is better). Balancers sum the scores and count the samples, so
micro-batches and ranks combine exactly. Any callable with that contract is a metric.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from multimodal_general.errors import ConfigurationError

UtilizationMetric = Callable[[Tensor, Tensor], Tensor]


def accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """Classification: 1 where the arg-max class is the target. Targets are class indices
    ``[N]`` or one-hot / probability rows ``[N, C]``."""
    if target.dim() == logits.dim():
        target = target.argmax(dim=-1)
    return (logits.argmax(dim=-1) == target).float()


def binary_accuracy(prediction: Tensor, target: Tensor) -> Tensor:
    """Regression read as two classes, non-negative vs negative (MOSI's Acc-2)."""
    prediction, target = _per_sample_values(prediction, target)
    return ((prediction >= 0) == (target >= 0)).float()


def negative_mae(prediction: Tensor, target: Tensor) -> Tensor:
    """Regression: minus the absolute error of each sample (larger is better)."""
    prediction, target = _per_sample_values(prediction, target)
    return -(prediction - target).abs()


def soft_dice(logits: Tensor, target: Tensor, smooth: float = 1e-5) -> Tensor:
    """Segmentation: per-sample Dice of sigmoid probabilities, averaged over regions.

    ``logits`` and ``target`` are ``[N, R, *spatial]`` (one channel per region, targets 0/1).
    """
    return _region_dice(torch.sigmoid(logits.float()), target.float(), smooth)


def hard_dice(logits: Tensor, target: Tensor, smooth: float = 1e-5) -> Tensor:
    """Segmentation: per-sample Dice of the masks ``sigmoid(logits) > 0.5``, averaged over
    regions; a region empty in both prediction and target scores 1."""
    return _region_dice((logits > 0).float(), target.float(), smooth)


def _region_dice(prob: Tensor, target: Tensor, smooth: float) -> Tensor:
    if prob.shape != target.shape or prob.dim() < 3:
        raise ValueError(
            f"Dice needs prediction and target of one shape [N, R, *spatial]; got "
            f"{tuple(prob.shape)} and {tuple(target.shape)}"
        )
    dims = tuple(range(2, prob.dim()))
    intersection = (prob * target).sum(dims)
    total = prob.sum(dims) + target.sum(dims)
    return ((2 * intersection + smooth) / (total + smooth)).mean(dim=1)


def _per_sample_values(prediction: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    n = prediction.shape[0]
    prediction, target = prediction.reshape(n, -1), target.reshape(target.shape[0], -1)
    if prediction.shape != target.shape or prediction.shape[1] != 1:
        raise ValueError(
            f"regression metrics need one value per sample; got prediction "
            f"{tuple(prediction.shape)} and target {tuple(target.shape)}"
        )
    return prediction[:, 0], target[:, 0]


METRICS: dict[str, UtilizationMetric] = {
    "accuracy": accuracy,
    "binary_accuracy": binary_accuracy,
    "neg_mae": negative_mae,
    "soft_dice": soft_dice,
    "hard_dice": hard_dice,
}


def resolve_metric(metric: str | UtilizationMetric) -> UtilizationMetric:
    """A metric by name (see ``METRICS``) or any callable with the metric contract."""
    if callable(metric):
        return metric
    try:
        return METRICS[metric]
    except KeyError:
        raise ConfigurationError(
            f"unknown utilization metric '{metric}'; choose one of {sorted(METRICS)}"
        ) from None
