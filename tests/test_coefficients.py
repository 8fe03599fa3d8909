"""Known-answer tests of CGGM's balancing coefficients B."""

import math

import pytest
import torch

from multimodal_general.balance.coefficients import (
    deficit_coefficients,
    ema_update,
    paper_coefficients,
    stable_coefficients,
    trend,
)


@pytest.mark.parametrize(
    ("d", "rho", "expected"),
    [
        # M = 2: B_1 = rho * d_2 / (d_1 + d_2)
        ([0.1, 0.3], 1.2, [1.2 * 0.3 / 0.4, 1.2 * 0.1 / 0.4]),
        # M = 3: (0.2 + 0.3) / 0.6, (0.1 + 0.3) / 0.6, (0.1 + 0.2) / 0.6
        ([0.1, 0.2, 0.3], 1.0, [5 / 6, 4 / 6, 3 / 6]),
        # M = 4, rho 1.3: 1.3 * [0.7, 0.7, 0.6, 0.4] / 0.8
        ([0.1, 0.1, 0.2, 0.4], 1.3, [1.1375, 1.1375, 0.975, 0.65]),
    ],
)
def test_paper_and_stable_agree_with_hand_computed_values(d, rho, expected):
    d = torch.tensor(d, dtype=torch.float64)
    assert torch.allclose(paper_coefficients(d, rho), torch.tensor(expected, dtype=torch.float64), rtol=1e-6)
    stable, usable = stable_coefficients(d, rho, min_signal=1e-6)
    assert bool(usable)
    assert torch.allclose(stable, torch.tensor(expected, dtype=torch.float64), rtol=1e-12)


@pytest.mark.parametrize("m", [2, 3, 4, 7])
def test_coefficients_sum_to_rho_times_m_minus_one(m):
    d = torch.rand(m, dtype=torch.float64) + 0.01
    assert math.isclose(float(paper_coefficients(d, 1.0).sum()), m - 1, rel_tol=1e-6)
    assert math.isclose(float(stable_coefficients(d, 1.2, 1e-6)[0].sum()), 1.2 * (m - 1), rel_tol=1e-9)


def test_fastest_modality_gets_the_smallest_coefficient():
    b = paper_coefficients(torch.tensor([0.5, 0.1, 0.2]), 1.2)
    assert int(b.argmin()) == 0 and int(b.argmax()) == 1


def test_paper_formula_explodes_when_improvements_cancel_and_stable_stays_in_range():
    d = torch.tensor([0.05, -0.05])
    paper = paper_coefficients(d, 1.2)
    assert paper.abs().max() > 1e5  # the published formula: 1.2 * 0.05 / 1e-8
    stable, usable = stable_coefficients(d, 1.2, 1e-6)
    assert bool(usable)
    assert torch.allclose(stable, torch.tensor([0.0, 1.2]))  # the regressing one counts as lagging


def test_mixed_signs_reverse_a_gradient_in_paper_but_not_in_stable():
    d = torch.tensor([0.3, -0.1])
    assert torch.allclose(paper_coefficients(d, 1.2), torch.tensor([-0.6, 1.8]), atol=1e-6)
    stable, _ = stable_coefficients(d, 1.2, 1e-6)
    assert torch.allclose(stable, torch.tensor([0.0, 1.2]))


@pytest.mark.parametrize("d", [[-0.1, -0.2], [0.0, 0.0], [0.0, 0.0, 0.0], [-1e-3, 0.0, -5e-4]])
def test_stable_without_usable_signal_leaves_gradients_untouched(d):
    stable, usable = stable_coefficients(torch.tensor(d), 1.2, 1e-6)
    assert not bool(usable)
    assert torch.equal(stable, torch.ones(len(d)))


def test_stable_is_finite_and_in_range_on_random_degenerate_inputs():
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        m = int(torch.randint(2, 6, (1,), generator=g))
        d = torch.randn(m, generator=g) * 10 ** float(torch.randint(-9, 1, (1,), generator=g))
        b, _ = stable_coefficients(d, 1.3, 1e-6)
        assert torch.isfinite(b).all() and (b >= 0).all() and (b <= 1.3).all()


def test_trend_of_a_linear_rise_is_proportional_to_its_slope():
    fast, slow, count = torch.zeros(2), torch.zeros(2), torch.zeros(())
    slopes = torch.tensor([1e-3, 4e-4])
    for t in range(1, 3001):
        count += 1
        eps = slopes * t
        ema_update(fast, eps, 0.9)
        ema_update(slow, eps, 0.99)
    d = trend(fast, slow, count, 0.9, 0.99)
    # lag of an EMA is beta / (1 - beta): 9 steps (fast) and 99 steps (slow)
    assert torch.allclose(d, slopes * (99 - 9), rtol=1e-3)


def test_trend_is_zero_after_the_first_observation():
    fast, slow = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    count = torch.ones((), dtype=torch.float64)
    eps = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    ema_update(fast, eps, 0.9)
    ema_update(slow, eps, 0.99)
    assert trend(fast, slow, count, 0.9, 0.99).abs().max() < 1e-12


@pytest.mark.parametrize(
    ("level", "rho", "expected"),
    [
        # deficits 0.8, 0.4 (mean 0.6): B = rho * deficit / mean
        ([0.2, 0.6], 1.0, [4 / 3, 2 / 3]),
        # four heads, T1 far behind: deficits 0.4, 0.8, 0.4, 0.4 (mean 0.5), rho 1.2
        ([0.6, 0.2, 0.6, 0.6], 1.2, [0.96, 1.92, 0.96, 0.96]),
        # a head above 1 (not a Dice) counts as no deficit: deficits 0, 0.5 (mean 0.25)
        ([1.5, 0.5], 1.0, [0.0, 2.0]),
    ],
)
def test_deficit_coefficients_agree_with_hand_computed_values(level, rho, expected):
    b, usable = deficit_coefficients(torch.tensor(level, dtype=torch.float64), rho, min_signal=1e-6)
    assert bool(usable)
    assert torch.allclose(b, torch.tensor(expected, dtype=torch.float64), rtol=1e-12)
    assert math.isclose(float(b.mean()), rho, rel_tol=1e-12)  # the mean gradient scale is rho's


def test_deficit_coefficients_favour_the_lower_level_whatever_its_rate():
    """The paper's rule gives a weak head that rises fast the smaller B; the deficit rule the larger."""
    levels = torch.tensor([0.3, 0.7])  # head 0 weak ...
    rates = torch.tensor([0.02, 0.005])  # ... and rising fastest
    assert paper_coefficients(rates, 1.0)[0] < paper_coefficients(rates, 1.0)[1]
    b, _ = deficit_coefficients(levels, 1.0, 1e-6)
    assert b[0] > 1.0 > b[1]


def test_deficit_coefficients_leave_gradients_alone_when_every_head_is_perfect():
    b, usable = deficit_coefficients(torch.tensor([1.0, 1.0, 1.0]), 1.2, min_signal=1e-6)
    assert not bool(usable)
    assert torch.equal(b, torch.ones(3))
