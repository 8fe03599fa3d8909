"""Utilization metrics: per-sample scores with known values."""

import pytest
import torch

from multimodal_general.balance.metrics import (
    accuracy,
    binary_accuracy,
    hard_dice,
    negative_mae,
    resolve_metric,
    soft_dice,
)


def test_accuracy_with_indices_and_one_hot_targets():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [0.0, 5.0, 1.0]])
    assert torch.equal(accuracy(logits, torch.tensor([0, 1, 1])), torch.tensor([1.0, 0.0, 1.0]))
    one_hot = torch.eye(3)[[0, 2, 0]]
    assert torch.equal(accuracy(logits, one_hot), torch.tensor([1.0, 1.0, 0.0]))


def test_regression_metrics_take_n_and_n_by_1_and_the_mosi_n_1_1_shape():
    prediction = torch.tensor([[0.5], [-1.0], [2.0], [0.0]])
    target = torch.tensor([1.0, 0.5, 2.5, -0.1]).reshape(4, 1, 1)
    assert torch.equal(binary_accuracy(prediction, target), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert torch.allclose(negative_mae(prediction, target), torch.tensor([-0.5, -1.5, -0.5, -0.1]))


def test_regression_metrics_refuse_shapes_that_would_broadcast():
    with pytest.raises(ValueError, match="one value per sample"):
        negative_mae(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="one value per sample"):
        negative_mae(torch.zeros(4, 1), torch.zeros(3, 1))


def test_hard_dice_per_sample_mean_over_regions():
    logits = torch.full((2, 2, 4), -5.0)
    target = torch.zeros(2, 2, 4)
    # sample 0: region 0 predicted {0,1}, true {1,2} -> 2*1/(2+2) = 0.5; region 1 empty in both -> 1
    logits[0, 0, :2] = 5.0
    target[0, 0, 1:3] = 1
    # sample 1: region 0 perfect, region 1 missed entirely -> 0
    logits[1, 0, 0] = 5.0
    target[1, 0, 0] = 1
    target[1, 1, 3] = 1
    assert torch.allclose(hard_dice(logits, target), torch.tensor([0.75, 0.5]), atol=1e-4)


def test_soft_dice_uses_probabilities():
    logits = torch.zeros(1, 1, 2, 2)  # p = 0.5 everywhere
    target = torch.ones(1, 1, 2, 2)
    assert torch.allclose(soft_dice(logits, target), torch.tensor([2 * 2.0 / (2.0 + 4.0)]), atol=1e-4)
    with pytest.raises(ValueError, match=r"\[N, R, \*spatial\]"):
        soft_dice(torch.zeros(2, 3), torch.zeros(2, 3))


def test_a_custom_metric_is_any_callable():
    metric = resolve_metric(lambda p, t: (p - t).abs().neg().flatten())
    assert torch.equal(metric(torch.ones(2), torch.zeros(2)), -torch.ones(2))
