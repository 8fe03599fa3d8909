"""Linear probes on frozen features: how much task information an encoder carries."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _standardize(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def probe_accuracy(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, classes: int,
    weight_decay: float = 1e-3, iterations: int = 100,
) -> float:
    """Test accuracy of an L2-regularized multinomial logistic regression (L-BFGS)."""
    train_x, test_x = _standardize(train_x.double(), test_x.double())
    weight = torch.zeros(train_x.shape[1] + 1, classes, dtype=torch.float64, requires_grad=True)
    ones = train_x.new_ones(len(train_x), 1)
    design = torch.cat([train_x, ones], dim=1)
    optimizer = torch.optim.LBFGS([weight], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(design @ weight, train_y) + weight_decay * weight[:-1].square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        logits = torch.cat([test_x, test_x.new_ones(len(test_x), 1)], dim=1) @ weight
        return float((logits.argmax(1) == test_y).double().mean())


def probe_mae(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, ridge: float = 1e-3
) -> float:
    """Test mean absolute error of a ridge regression on the features."""
    train_x, test_x = _standardize(train_x.double(), test_x.double())
    design = torch.cat([train_x, train_x.new_ones(len(train_x), 1)], dim=1)
    gram = design.T @ design + ridge * len(design) * torch.eye(design.shape[1], dtype=design.dtype)
    weight = torch.linalg.solve(gram, design.T @ train_y.double().reshape(len(design), -1))
    prediction = torch.cat([test_x, test_x.new_ones(len(test_x), 1)], dim=1) @ weight
    return float((prediction - test_y.double().reshape(len(test_x), -1)).abs().mean())
