"""Which cases a run trains and validates on, and which of them each process reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from brats_cggm.data.layouts import Case, discover
from brats_cggm.data.splits import load_split, make_split
from brats_cggm.errors import ConfigurationError, InconsistentCase
from brats_cggm.training.config import DataConfig


@dataclass
class RunCases:
    train: list[Case]
    val: list[Case]
    #: the split file's content (saved in the run folder)
    split: dict


def select_cases(data: DataConfig) -> RunCases:
    """The training and validation cases of ``data.dir``: from the split file when one is
    given, else a split of ``data.val_fraction`` drawn with ``data.split_seed``.

    A folder with a case that is not usable is an error (the first problem is named):
    silently training on fewer cases than the user has would change the experiment.
    """
    if data.dir is None:
        raise ConfigurationError("no data folder: give --data DIR (or data.dir in the configuration)")
    found = discover(data.dir, data.layout, partial=data.partial)
    if found.problems:
        more = f" (and {len(found.problems) - 1} more problem(s); `brats-cggm check` lists them)" if len(found.problems) > 1 else ""
        hint = ("; to train on cases that lack sequences, pass --partial"
                if not data.partial and "missing sequence" in found.problems[0].problem else "")
        raise type(found.problems[0])(found.problems[0].path, found.problems[0].problem + hint + more)
    by_id = {case.case_id: case for case in found.cases}
    if data.split is not None:
        split = load_split(data.split, known_ids=list(by_id))
    else:
        split = make_split(list(by_id), val_fraction=data.val_fraction, seed=data.split_seed)
    folds = split["folds"]
    if not 0 <= data.fold < len(folds):
        raise ConfigurationError(f"data.fold {data.fold} does not exist; the split has {len(folds)} fold(s)")
    fold = folds[data.fold]
    missing = [c for c in ("train", "val") if not fold[c]]
    if missing:
        raise InconsistentCase(Path(data.dir), f"the split leaves no {missing[0]} cases")
    return RunCases([by_id[i] for i in fold["train"]], [by_id[i] for i in fold["val"]], split)


def shard(cases: list[Case], rank: int, world_size: int, equal: bool) -> list[Case]:
    """The cases process ``rank`` of ``world_size`` reads (each caches only its own).

    ``equal=True`` (training) gives every rank the same number of cases, dropping at most
    ``world_size - 1``, so that all ranks take the same number of optimizer steps.
    """
    if world_size > len(cases):
        raise ConfigurationError(f"{world_size} processes need at least as many cases; there are {len(cases)}")
    mine = cases[rank::world_size]
    return mine[: len(cases) // world_size] if equal else mine
