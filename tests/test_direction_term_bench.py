"""bench/direction_term.py on conftest's tiny CGGM run: the task's and the direction term's
gradients per part of the network, and the direction term in proportion to ``lam``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "direction_term", Path(__file__).resolve().parents[1] / "bench" / "direction_term.py")
direction_term = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(direction_term)


def test_both_gradients_reach_every_part_and_the_direction_term_scales_with_lam(tiny_export):
    rows = direction_term.measure(tiny_export.run, "last", batches=1, fresh=False)
    parts = [r["part"] for r in rows]
    assert parts == [f"encoder {m}" for m in ("flair", "t1", "t1ce", "t2")] + ["fusion + decoder", "output convolution"]
    # L_gm is a cosine of gradients, differentiated twice: it reaches the encoders, not only the output layer
    assert all(r["task"] > 0 and r["direction"] > 0 and -1 <= r["cos"] <= 1 for r in rows), rows
    doubled = direction_term.measure(tiny_export.run, "last", batches=1, fresh=False, lam=0.2)
    for row, twice in zip(rows, doubled):
        assert twice["task"] == pytest.approx(row["task"], rel=1e-5)
        assert twice["direction"] == pytest.approx(2 * row["direction"], rel=1e-4)  # the run's lam is 0.1

