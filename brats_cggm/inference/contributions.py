"""Per-sequence contribution maps, from predictions with branches switched off.

A *coalition* is a set of sequences whose branches are on (a row of ``modality_mask``);
``v(T)`` is the model's probability map with only ``T`` on. A method is a list of
coalitions plus a weight matrix ``W [k, S]`` such that sequence ``i``'s contribution is
``sum_s W[i, s] * v(T_s)``, voxel by voxel and region by region. Both methods below are
linear in the ``v(T_s)``, so they can be accumulated window by window during sliding-window
inference and blended like the probabilities themselves.

* ``occlusion``: ``v(P) - v(P \\ {i})`` with ``P`` the sequences present: how much the
  prediction drops without sequence ``i`` (``1 + k`` passes).
* ``shapley``: exact Shapley values over all ``2^k`` coalitions of the present sequences,
  ``phi_i = sum_{T not containing i} |T|! (k-|T|-1)! / k! * (v(T + i) - v(T))``. They add up
  to ``v(P) - v({})`` at every voxel (efficiency).

:func:`region_shares` turns maps into one number per sequence and region: the share of the
positive contributions inside the predicted region carried by each sequence.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from brats_cggm import MODALITIES
from brats_cggm.data.labels import REGIONS
from brats_cggm.errors import ConfigurationError

METHODS = ("occlusion", "shapley")


@dataclass(frozen=True)
class CoalitionPlan:
    """Which coalitions to predict with, and how to combine them."""

    #: ``[S, M]`` bool: the branches switched on in each pass (row ``full`` = all present)
    masks: np.ndarray
    #: ``[k, S]``: contribution of ``sequences[i]`` = ``sum_s weights[i, s] * v(masks[s])``
    weights: np.ndarray
    #: the sequences that get a map (those present), in canonical order
    sequences: tuple[str, ...]
    full: int = 0


def coalition_plan(present: Sequence[bool], method: str | None) -> CoalitionPlan:
    """The plan for the sequences ``present`` (``[M]`` bools) and ``method`` (``None``:
    the prediction alone)."""
    present = np.asarray(present, dtype=bool)
    on = [i for i in range(len(present)) if present[i]]
    sequences = tuple(MODALITIES[i] for i in on)
    if method is None:
        return CoalitionPlan(present[None], np.zeros((0, 1)), ())
    if method == "occlusion":
        masks = [present.copy()]
        for i in on:
            without = present.copy()
            without[i] = False
            masks.append(without)
        weights = np.zeros((len(on), len(masks)))
        weights[:, 0] = 1.0
        weights[np.arange(len(on)), np.arange(1, len(masks))] = -1.0
        return CoalitionPlan(np.stack(masks), weights, sequences)
    if method == "shapley":
        k = len(on)
        coalitions = [c for size in range(k + 1) for c in itertools.combinations(on, size)]
        masks = np.zeros((len(coalitions), len(present)), dtype=bool)
        weights = np.zeros((k, len(coalitions)))
        for s, coalition in enumerate(coalitions):
            masks[s, list(coalition)] = True
            for row, i in enumerate(on):
                if i in coalition:  # v(T) with T = U + i enters phi_i with +w(|U|)
                    weights[row, s] += _shapley_weight(len(coalition) - 1, k)
                else:  # v(T) enters phi_i with -w(|T|)
                    weights[row, s] -= _shapley_weight(len(coalition), k)
        return CoalitionPlan(masks, weights, sequences, full=len(coalitions) - 1)
    raise ConfigurationError(f"unknown contribution method '{method}'; choose {' or '.join(METHODS)}")


def _shapley_weight(size: int, players: int) -> float:
    return math.factorial(size) * math.factorial(players - size - 1) / math.factorial(players)


def region_shares(maps: dict[str, np.ndarray], regions: np.ndarray) -> dict[str, dict[str, float]]:
    """For each region (TC, WT, ET), each sequence's share of the positive contributions
    inside the predicted region (``maps[seq]`` and ``regions`` are ``[3, *shape]``); the
    shares of a region add up to 1, or are all 0 when the region is empty or nothing in it
    depends on any sequence."""
    shares = {}
    for r, region in enumerate(REGIONS):
        inside = np.asarray(regions[r], dtype=bool)
        mass = {seq: float(np.clip(m[r][inside], 0, None).sum()) for seq, m in maps.items()}
        total = sum(mass.values())
        shares[region] = {seq: (value / total if total > 0 else 0.0) for seq, value in mass.items()}
    return shares
