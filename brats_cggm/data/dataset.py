"""Data sets and loaders over BraTS cases, with the deterministic part of a chain cached.

MONAI's cached data sets run a transform chain up to its first random transform once
per case and keep the result; the chains of :mod:`brats_cggm.data.transforms` put every
costly step (loading, resampling, cropping, normalising) before the first random one,
so an epoch only draws patches and augments them.

* ``cache="memory"``: :class:`monai.data.CacheDataset` (fastest; holds every
  preprocessed case in RAM, about 16 bytes per voxel of the cropped volume)
* ``cache="disk"``: :class:`monai.data.PersistentDataset` (one file per case in
  ``cache_dir``, keyed by the case's data dict, its files' sizes and modification
  times, the cached transforms and the chain's :class:`PreprocessConfig`, so neither a
  changed configuration nor a rewritten file reads a stale entry)
* ``cache="none"``: :class:`monai.data.Dataset` (everything on every visit)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.data.utils import json_hashing, pickle_hashing

from brats_cggm.data.layouts import Case
from brats_cggm.data.transforms import case_to_dict
from brats_cggm.data.validation import validate_case
from brats_cggm.errors import ConfigurationError, InconsistentCase

CACHE_MODES = ("memory", "disk", "none")


def make_dataset(
    cases: Sequence[Case | Mapping[str, Any]],
    transforms: Callable,
    cache: str = "memory",
    cache_dir: str | Path | None = None,
    num_workers: int | None = None,
    validate: bool = True,
) -> Dataset:
    """A data set of ``cases`` (``Case`` objects or data dicts from ``case_to_dict``).

    ``num_workers`` is the number of threads that fill a memory cache (``None``: one per
    CPU); the cache is filled here, before the first epoch. With ``validate``, every
    ``Case`` is checked first (:func:`validate_case`): a bad file raises the same one-line
    error as ``brats-cggm check``, before any work is cached.
    """
    needs_label = getattr(transforms, "needs_label", False)
    for case in cases:
        if not isinstance(case, Case):
            continue
        if needs_label and case.label is None:
            raise InconsistentCase(case.images[0].parent, f"case {case.case_id} has no label map; training and validation need one")
        if validate:
            validate_case(case)
    data = [case_to_dict(c) if isinstance(c, Case) else dict(c) for c in cases]
    if cache == "memory":
        # copy_cache=False: no random transform of the chains writes into its input (crops
        # return views that later steps replace, never modify), so the deep copy of a whole
        # preprocessed case on every visit is wasted work; tests check the cache stays intact.
        return CacheDataset(data, transforms, cache_rate=1.0, num_workers=num_workers, copy_cache=False, progress=False)
    if cache == "disk":
        if cache_dir is None:
            raise ConfigurationError("cache='disk' needs a cache_dir")
        return PersistentDataset(
            data, transforms, cache_dir=cache_dir, hash_func=_case_hash, hash_transform=_transform_hash(transforms)
        )
    if cache == "none":
        return Dataset(data, transforms)
    raise ConfigurationError(f"unknown cache '{cache}'; choose one of {', '.join(CACHE_MODES)}")


def _case_hash(item: Mapping[str, Any]) -> bytes:
    """A disk-cache key of one case: its data dict plus the size and modification time of
    each of its files, so that a file rewritten in place is preprocessed again."""
    paths = [p for key in ("image", "label") for p in _as_list(item.get(key))]
    stamps = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    return pickle_hashing({**item, "_files": stamps})


def _as_list(value: Any) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _transform_hash(transforms: Callable) -> Callable[[list], bytes]:
    """A key for the cached steps of ``transforms`` (MONAI's own hashes only their class
    names): their names plus the chain's preprocessing configuration, when it has one."""
    config = getattr(transforms, "config", None)

    def key(cached_steps: list) -> bytes:
        names = [type(step).__name__ for step in cached_steps]
        return json_hashing({"steps": names, "config": config.to_dict() if config is not None else None})

    return key


def make_loader(
    dataset: Dataset,
    batch_size: int = 1,
    shuffle: bool = True,
    num_workers: int = 0,
    **kwargs: Any,
) -> DataLoader:
    """A MONAI loader over ``dataset``: each batch holds ``batch_size`` cases times the
    chain's patches per case (``num_samples``). ``kwargs`` go to the loader (a ``sampler``
    for distributed training, for instance: then pass ``shuffle=False``)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        **kwargs,
    )
