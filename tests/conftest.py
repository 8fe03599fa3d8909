"""Small models and batches shared by the balancer tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from training_cases import torch_threads

from multimodal_general.balance import CGGM, Modality
from multimodal_general.training.imbalance import LateFusionNet, unimodal_head

CLASSES = 3
FEATURES = 32


@pytest.fixture
def one_torch_thread():
    """Tiny models: one intra-op thread is far faster on a shared machine (as the CLI's default);
    the global thread count is restored after the test."""
    with torch_threads(1):
        yield


def make_setup(m: int = 2, *, preset: str = "stable", lam: float = 0.1, rho: float = 1.2, seed: int = 0, **options):
    """A LateFusionNet with ``m`` modalities of 5 inputs each, and a CGGM over it."""
    torch.manual_seed(seed)
    names = [f"m{i}" for i in range(m)]
    model = LateFusionNet({n: 5 for n in names}, CLASSES, hidden=16, feature_dim=FEATURES)
    criterion = nn.CrossEntropyLoss()
    modalities = []
    for n in names:
        head = unimodal_head(FEATURES, CLASSES)
        modalities.append(Modality(n, model.encoders[n], head, head[-1]))
    balancer = CGGM(
        modalities, fused_last_layer=model.last_layer, criterion=criterion,
        preset=preset, lam=lam, rho=rho, **options,
    )
    return model, balancer, criterion


def make_batch(m: int = 2, n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    inputs = {f"m{i}": torch.randn(n, 5, generator=g) for i in range(m)}
    return inputs, torch.randint(CLASSES, (n,), generator=g)


@pytest.fixture
def setup2():
    return make_setup(2)
