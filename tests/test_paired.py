"""The paired per-case comparison (multimodal_general.experiments.paired): known answers."""

import math
import subprocess
import sys

import numpy as np
import pytest

from multimodal_general.experiments.paired import case_means, interval_cell, paired_difference

RNG = np.random.default_rng(1)
CASES = {f"case{i}": float(v) for i, v in enumerate(RNG.uniform(0.4, 0.9, 13))}


def test_identical_rows_differ_by_exactly_zero():
    same = paired_difference(CASES, dict(CASES))
    assert (same["mean"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    assert (same["n"], same["improved"], same["worsened"]) == (13, 0, 0)


def test_a_constant_shift_is_that_shift_with_a_zero_width_interval():
    shifted = {case: value + 0.25 for case, value in CASES.items()}
    up = paired_difference(shifted, CASES)
    for key in ("mean", "low", "high"):
        assert up[key] == pytest.approx(0.25, abs=1e-12)
    assert (up["improved"], up["worsened"]) == (13, 0)
    down = paired_difference(shifted, CASES, higher_is_better=False)  # e.g. HD95: larger is worse
    assert (down["improved"], down["worsened"]) == (0, 13)


def test_the_interval_is_reproducible_holds_the_mean_and_depends_on_the_seed():
    noisy = {case: value + RNG.normal(0.02, 0.05) for case, value in CASES.items()}
    first, again = paired_difference(noisy, CASES), paired_difference(noisy, CASES)
    assert first == again
    assert first["low"] < first["mean"] < first["high"]
    assert first["improved"] + first["worsened"] == 13
    assert paired_difference(noisy, CASES, seed=1) != first
    assert paired_difference(dict(reversed(noisy.items())), CASES)["mean"] == pytest.approx(first["mean"])


def test_only_cases_present_in_both_with_finite_values_are_paired():
    row = {"a": 0.5, "b": 0.7, "c": math.nan, "only_here": 0.9}
    reference = {"b": 0.6, "a": 0.4, "c": 0.1, "only_there": 0.2}
    paired = paired_difference(row, reference)
    assert paired["n"] == 2 and paired["mean"] == pytest.approx(0.1)
    nothing = paired_difference({"x": 1.0}, {"y": 1.0})
    assert nothing["n"] == 0 and math.isnan(nothing["mean"]) and interval_cell(nothing) == "—"


def test_a_case_is_averaged_over_seeds_first():
    means = case_means([{"a": 0.2, "b": 0.5}, {"a": 0.4, "b": math.nan}, {"c": 1.0}])
    assert means == pytest.approx({"a": 0.3, "b": 0.5, "c": 1.0})
    assert interval_cell({"mean": 0.01, "low": -0.02, "high": 0.035, "n": 3}) == "+0.010 [-0.020, +0.035]"


def test_it_needs_no_torch():
    code = ("import sys; import multimodal_general.experiments.paired as p; "
            "p.paired_difference({'a': 1.0}, {'a': 0.0}); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_mean_over_cases_with_its_interval():
    from multimodal_general.experiments.paired import mean_interval

    values = {f"case{i}": v for i, v in enumerate([0.7, 0.8, 0.9, 0.6, float("nan")])}
    found = mean_interval(values)
    assert found["n"] == 4 and found["mean"] == pytest.approx(0.75)
    assert 0.6 <= found["low"] < 0.75 < found["high"] <= 0.9
    assert mean_interval({"a": 0.5}) == {"mean": 0.5, "low": 0.5, "high": 0.5, "n": 1}
