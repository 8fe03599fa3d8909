"""Deterministic train/validation splits, saved as JSON that training reads.

A split file::

    {"seed": 0, "scheme": "5-fold", "folds": [{"train": [...], "val": [...]}, ...]}

A ratio split is one fold. Users may write their own file in this format.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from brats_cggm.errors import BadInputFile, ConfigurationError
from multimodal_general.io import atomic_write_text


def make_split(
    case_ids: Sequence[str], *, folds: int | None = None, val_fraction: float | None = None, seed: int = 0
) -> dict:
    """``folds``-fold cross-validation, or one split with ``val_fraction`` of the cases in
    validation. The same ids and seed give the same split, whatever their input order."""
    if (folds is None) == (val_fraction is None):
        raise ConfigurationError("give either folds or val_fraction")
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise ConfigurationError("case ids must be unique")
    random.Random(seed).shuffle(ids)
    if folds is not None:
        if not 2 <= folds <= len(ids):
            raise ConfigurationError(f"folds must be between 2 and the number of cases ({len(ids)}), got {folds}")
        parts = [ids[i::folds] for i in range(folds)]
        result = [
            {"train": sorted(c for j, p in enumerate(parts) if j != i for c in p), "val": sorted(parts[i])}
            for i in range(folds)
        ]
        scheme = f"{folds}-fold"
    else:
        if not 0 < val_fraction < 1:
            raise ConfigurationError(f"val_fraction must be between 0 and 1, got {val_fraction}")
        if len(ids) < 2:
            raise ConfigurationError("a split needs at least 2 cases")
        n_val = min(max(1, round(len(ids) * val_fraction)), len(ids) - 1)
        result = [{"train": sorted(ids[n_val:]), "val": sorted(ids[:n_val])}]
        scheme = f"val_fraction={val_fraction}"
    return {"seed": seed, "scheme": scheme, "folds": result}


def save_split(split: dict, path: str | Path) -> Path:
    return atomic_write_text(path, json.dumps(split, indent=1) + "\n")


def load_split(path: str | Path, known_ids: Sequence[str] | None = None) -> dict:
    """Read and check a split file; with ``known_ids``, every id must be one of them."""
    path = Path(path)
    try:
        split = json.loads(path.read_text())
        folds = split["folds"]
        if not isinstance(folds, list) or not folds:
            raise TypeError("'folds' must be a non-empty list")
        for fold in folds:
            for key in ("train", "val"):
                ids = fold[key]
                if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
                    raise TypeError(f"'{key}' must be a non-empty list of case ids")
    except FileNotFoundError:
        raise BadInputFile(path, "split file is missing") from None
    except OSError as error:
        raise BadInputFile(path, f"cannot be read ({error.strerror})") from None
    except (ValueError, KeyError, TypeError) as error:
        raise BadInputFile(path, f"not a split file: {{'folds': [{{'train': [...], 'val': [...]}}]}} expected ({error})") from None
    for index, fold in enumerate(folds):
        overlap = sorted(set(fold["train"]) & set(fold["val"]))
        if overlap:
            raise BadInputFile(path, f"fold {index}: {len(overlap)} case(s) in both train and val, e.g. {overlap[0]}")
        if known_ids is not None:
            unknown = sorted((set(fold["train"]) | set(fold["val"])) - set(known_ids))
            if unknown:
                raise BadInputFile(path, f"fold {index}: {len(unknown)} case(s) not in the data, e.g. {unknown[0]}")
    return split
