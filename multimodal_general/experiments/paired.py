"""Paired per-case comparison of two configurations: the mean difference over the cases both
were scored on, with a percentile bootstrap 95 % interval (numpy only, reproducible).

Comparing two rows case by case removes the spread between cases (an easy case is easy for
both), which is what lets a table of few cases tell configurations apart at all; the interval
says how far the mean difference could move with another draw of cases. Over a dozen cases it
is wide: it is reported as it is, not narrowed by choice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["RESAMPLES", "case_means", "interval_cell", "mean_interval", "paired_difference"]

#: bootstrap resamples of the cases (fixed seed: the same values give the same interval)
RESAMPLES = 10_000


def case_means(per_run: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """``{case id: value}`` of several runs (seeds) -> each case's mean over the runs that scored
    it (finite values only; a case with none is left out), in first-seen order."""
    values: dict[str, list[float]] = {}
    for run in per_run:
        for case, value in run.items():
            if _finite(value):
                values.setdefault(case, []).append(float(value))
    return {case: float(np.mean(v)) for case, v in values.items()}


def paired_difference(values: Mapping[str, float], reference: Mapping[str, float], *,
                      higher_is_better: bool = True, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """``values - reference`` over the cases both hold (matched by case id; non-finite values
    left out): ``mean``, the percentile bootstrap 95 % interval ``low`` / ``high`` of the mean
    (``resamples`` draws of the cases with replacement, ``seed`` fixed), ``n`` cases, and how
    many ``improved`` / ``worsened`` (by ``higher_is_better``; ties count as neither).
    Without a shared case every number is NaN and the counts 0."""
    shared = [c for c in values if c in reference and _finite(values[c]) and _finite(reference[c])]
    if not shared:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0, "improved": 0, "worsened": 0}
    diff = np.array([values[c] for c in shared], dtype=float) - np.array([reference[c] for c in shared], dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
    low, high = np.percentile(diff[draws].mean(axis=1), [2.5, 97.5])
    better = diff > 0 if higher_is_better else diff < 0
    worse = diff < 0 if higher_is_better else diff > 0
    return {"mean": float(diff.mean()), "low": float(low), "high": float(high), "n": len(shared),
            "improved": int(better.sum()), "worsened": int(worse.sum())}


def mean_interval(values: Mapping[str, float], *, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """The mean over cases of ``{case: value}`` with its percentile bootstrap 95 % interval
    (``mean``, ``low``, ``high``, ``n``; non-finite values left out): what a new case drawn like
    these would score on average, and how sure these cases make it."""
    zero = {case: 0.0 for case in values}
    difference = paired_difference(values, zero, resamples=resamples, seed=seed)
    return {key: difference[key] for key in ("mean", "low", "high", "n")}


def interval_cell(difference: Mapping, digits: int = 3) -> str:
    """``"+0.012 [-0.004, +0.030]"``, or ``"—"`` without a shared case."""
    if not difference["n"]:
        return "—"
    return f"{difference['mean']:+.{digits}f} [{difference['low']:+.{digits}f}, {difference['high']:+.{digits}f}]"


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)
