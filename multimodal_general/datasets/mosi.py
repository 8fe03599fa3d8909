"""CMU-MOSI in the MulT pickle format: reader and synthetic writer.

The format (what MulT's ``mosi_data.pkl`` / ``mosi_data_noalign.pkl`` hold), as read by
MulT's own loader (github yaohungt/Multimodal-Transformer, ``src/dataset.py``) and by the
loaders built on those files (e.g. MISA's ``create_dataset.py``):

* a pickled ``dict`` with the splits ``train``, ``valid``, ``test`` (the official MOSI
  split sizes are 1284 / 229 / 686);
* each split a ``dict`` of arrays: ``text`` ``[N, T, 300]`` (GloVe), ``audio`` ``[N, T, 5]``
  (COVAREP; may contain ``-inf``, which MulT sets to 0), ``vision`` ``[N, T, 20]`` (Facet),
  ``labels`` ``[N, 1, 1]`` sentiment in ``[-3, 3]`` (MulT reads ``labels.shape[1:]`` as
  "number of labels, label dim"), and optionally ``id``;
* aligned file: every modality has ``T = 50``; unaligned: text 50, audio 375, vision 500;
* no lengths are stored: sequences are **zero-padded on the left** (the real steps are the
  last ones; MulT's authors, issue #3 "left padding zeroes or truncating"; MISA recovers a
  sequence as ``x[T - length:]`` with ``length`` = the number of steps that are not all 0);
* ``id`` is an ``[N, 3]`` array of ``bytes`` (MulT decodes ``meta[i][0..2]`` with UTF-8 for
  MOSI); column 0 is ``"<video>_<clip>"`` (MISA splits it with ``(.*)_(.*)``).

Not verified (the pickles themselves are not public in any searchable form): the stored
dtype of the feature arrays (every loader casts them to float32; the writer stores float32)
and what ``id`` columns 1 and 2 hold (the writer stores the clip's start and end time as
text). The reader uses only column 0.

Pickles run code when loaded: read only files from a source you trust.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from multimodal_general.datasets.latent_evidence import (
    embed_in_sequences,
    imbalanced_strengths,
    latent_evidence,
    random_lengths,
)
from multimodal_general.datasets.task_data import (
    SPLITS,
    SequenceSplit,
    TaskData,
    mask_of_zero_padding,
    real_steps_first,
)
from multimodal_general.errors import BadDataFile
from multimodal_general.io import atomic_write

MODALITIES = ("text", "audio", "vision")
FEATURE_DIMS = {"text": 300, "audio": 5, "vision": 20}
ALIGNED_STEPS = {"text": 50, "audio": 50, "vision": 50}
UNALIGNED_STEPS = {"text": 50, "audio": 375, "vision": 500}
LABEL_LIMIT = 3.0

_LABEL_TRAP = (
    "must be [N, 1, 1] (the MulT format) or [N, 1]; a flat [N] target against a model's "
    "[N, 1] output would broadcast to [N, N] in the loss without any error"
)


# ----------------------------------------------------------------------------- reading


def read_mosi(path: str | Path) -> TaskData:
    """Read a MulT-format MOSI pickle into a regression :class:`TaskData`.

    Targets are float32 ``[N, 1]``; ``-inf`` in audio becomes 0; masks mark the steps that
    are not all zero; ``details["aligned"]`` is True when every modality has the same number
    of steps. Any problem with the file raises a one-line :class:`BadDataFile`.
    """
    path = Path(path)
    content = _load_pickle(path)
    if not isinstance(content, dict):
        raise BadDataFile(path, f"holds a {type(content).__name__}, not a dict of splits "
                                f"{list(SPLITS)}")
    raw = {name: _split_arrays(path, content, name) for name in SPLITS}
    _check_feature_dims(path, raw)
    splits = {name: _to_split(path, name, arrays) for name, arrays in raw.items()}
    return TaskData(
        task="mosi",
        kind="regression",
        modalities=MODALITIES,
        splits=splits,
        source=path,
        details={"aligned": _is_aligned(raw)},
    )


def _load_pickle(path: Path) -> object:
    if not path.exists():
        raise BadDataFile(path, "no such file")
    if not path.is_file():
        raise BadDataFile(path, "not a file")
    try:
        with path.open("rb") as handle:
            try:
                return pickle.load(handle)
            except UnicodeDecodeError:  # written by Python 2
                handle.seek(0)
                return pickle.load(handle, encoding="latin1")
    except OSError as error:
        raise BadDataFile(path, f"cannot read ({error.strerror or error})") from None
    except Exception as error:  # noqa: BLE001 -- unpickling a foreign file raises anything
        raise BadDataFile(path, f"not a readable pickle ({type(error).__name__})") from None


def _split_arrays(path: Path, content: dict, name: str) -> dict[str, np.ndarray]:
    """The split's feature and label arrays, checked for type, rank and sample count."""
    if name not in content:
        raise BadDataFile(path, f"has no split {name!r} (found {sorted(map(str, content))})")
    split = content[name]
    if not isinstance(split, Mapping):
        raise BadDataFile(path, f"split {name!r} is a {type(split).__name__}, not a dict")
    arrays = {}
    for key in (*MODALITIES, "labels"):
        if key not in split:
            raise BadDataFile(path, f"split {name!r} has no {key!r}")
        arrays[key] = _numeric(path, name, key, split[key])
    for m in MODALITIES:
        if arrays[m].ndim != 3:
            raise BadDataFile(path, f"split {name!r}: {m!r} has shape {arrays[m].shape}, "
                                    "expected [samples, steps, features]")
    n = len(arrays["labels"])
    for m in MODALITIES:
        if len(arrays[m]) != n:
            raise BadDataFile(path, f"split {name!r}: {m!r} has {len(arrays[m])} samples "
                                    f"but 'labels' has {n}")
    if "id" in split:
        arrays["id"] = np.asarray(split["id"])
    return arrays


def _numeric(path: Path, split: str, key: str, value: object) -> np.ndarray:
    array = None
    try:
        if isinstance(value, (np.ndarray, list, tuple)):
            array = np.asarray(value)
        elif hasattr(value, "numpy"):  # a torch tensor
            array = np.asarray(value.numpy())
    except (TypeError, ValueError):  # ragged lists
        array = None
    if array is None or array.dtype.kind not in "fiu":
        kind = type(value).__name__ if array is None else str(array.dtype)
        raise BadDataFile(path, f"split {split!r}: {key!r} is {kind}, not a numeric array")
    return array


def _check_feature_dims(path: Path, raw: dict[str, dict[str, np.ndarray]]) -> None:
    """Other feature sizes than the official ones are fine, but every split must agree."""
    first = SPLITS[0]
    for name in SPLITS[1:]:
        for m in MODALITIES:
            have, want = raw[name][m].shape[2], raw[first][m].shape[2]
            if have != want:
                raise BadDataFile(path, f"split {name!r}: {m!r} has {have} features per step "
                                        f"but split {first!r} has {want}")


def _features(path: Path, split: str, m: str, array: np.ndarray) -> torch.Tensor:
    values = array.astype(np.float32)  # a copy: the caller's arrays stay untouched
    if m == "audio":
        values[values == -np.inf] = 0.0  # COVAREP's log of 0, as MulT does
    bad = ~np.isfinite(values)
    if bad.any():
        sample = int(np.argwhere(bad)[0][0])
        what = "NaN" if np.isnan(values[bad]).any() else "infinite values"
        raise BadDataFile(path, f"split {split!r}: {m!r} has {what} (first in sample {sample})")
    return torch.from_numpy(values)


def _targets(path: Path, split: str, labels: np.ndarray) -> torch.Tensor:
    n = len(labels)
    if labels.shape not in ((n, 1, 1), (n, 1)):
        raise BadDataFile(path, f"split {split!r}: 'labels' has shape {labels.shape}; "
                                f"labels {_LABEL_TRAP}")
    values = labels.reshape(n, 1).astype(np.float32)
    if not np.isfinite(values).all():
        raise BadDataFile(path, f"split {split!r}: 'labels' has NaN or infinite values")
    outside = np.abs(values) > LABEL_LIMIT
    if outside.any():
        example = float(values[outside][0])
        raise BadDataFile(path, f"split {split!r}: {int(outside.sum())} labels lie outside "
                                f"[-{LABEL_LIMIT:g}, {LABEL_LIMIT:g}] (e.g. {example:g})")
    return torch.from_numpy(values)


def _ids(path: Path, split: str, arrays: dict[str, np.ndarray]) -> list[str]:
    n = len(arrays["labels"])
    if "id" not in arrays:
        return [f"{split}/{i}" for i in range(n)]
    ids = arrays["id"]
    if ids.ndim == 2:
        ids = ids[:, 0]
    if ids.ndim != 1 or len(ids) != n:
        raise BadDataFile(path, f"split {split!r}: 'id' has shape {arrays['id'].shape}, "
                                f"expected [{n}, 3] or [{n}]")
    return [item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)
            for item in ids.tolist()]


def _to_split(path: Path, name: str, arrays: dict[str, np.ndarray]) -> SequenceSplit:
    # MulT pads on the left; in memory the real steps come first (positions start at the
    # first real step whatever the padding, as for every other task)
    aligned = {}
    for m in MODALITIES:
        x = _features(path, name, m, arrays[m])
        aligned[m] = real_steps_first(x, mask_of_zero_padding(x))
    return SequenceSplit(
        inputs={m: x for m, (x, _) in aligned.items()},
        masks={m: mask for m, (_, mask) in aligned.items()},
        target=_targets(path, name, arrays["labels"]),
        ids=_ids(path, name, arrays),
    )


def _is_aligned(raw: dict[str, dict[str, np.ndarray]]) -> bool:
    return all(len({arrays[m].shape[1] for m in MODALITIES}) == 1 for arrays in raw.values())


# ----------------------------------------------------------------------------- writing


def write_synthetic_mosi(
    path: str | Path,
    *,
    aligned: bool = True,
    sizes: tuple[int, int, int] = (300, 100, 100),
    steps: int | Mapping[str, int] | None = None,
    imbalance: float = 4.0,
    dominant: str = "text",
    strength: float = 2.0,
    seed: int = 0,
) -> Path:
    """Write a MOSI-like MulT pickle whose sentiment each modality predicts to a controlled
    degree (``dominant`` gets ``strength``, the others ``strength / imbalance``).

    ``steps``: padded length per modality (an int for all, or a dict); by default 50 for every
    modality when ``aligned``, else text 50, audio 375, vision 500. Aligned samples share one
    length across modalities. Sequences are left-padded with zeros, a few audio values are
    ``-inf``, labels are float32 ``[N, 1, 1]``, ``id`` is ``[N, 3]`` bytes. Written atomically.
    """
    steps_of = _steps(aligned, steps)
    strengths = imbalanced_strengths(MODALITIES, dominant, strength, imbalance)
    content = {
        name: _synthetic_split(n, aligned, steps_of, strengths, seed, index)
        for index, (name, n) in enumerate(zip(SPLITS, sizes, strict=True))
    }
    return atomic_write(path, lambda handle: pickle.dump(content, handle, protocol=4))


def _steps(aligned: bool, steps: int | Mapping[str, int] | None) -> dict[str, int]:
    if steps is None:
        return dict(ALIGNED_STEPS if aligned else UNALIGNED_STEPS)
    chosen = {m: steps for m in MODALITIES} if isinstance(steps, int) else dict(steps)
    if set(chosen) != set(MODALITIES) or min(chosen.values()) < 1:
        raise ValueError(f"steps must give a positive length for each of {MODALITIES}")
    if aligned and len(set(chosen.values())) != 1:
        raise ValueError(f"aligned data has one length for all modalities, got {chosen}")
    return chosen


def _world(seed: int) -> np.random.Generator:
    """The task's fixed randomness (directions, projections): the same for every split."""
    return np.random.default_rng([seed, 0])


def _synthetic_split(
    n: int,
    aligned: bool,
    steps: dict[str, int],
    strengths: dict[str, float],
    seed: int,
    index: int,
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 1 + index])
    world = _world(seed)
    target, latents = latent_evidence("regression", n, strengths, rng, world, limit=LABEL_LIMIT)
    shared = random_lengths(n, max(1, steps["text"] // 4), steps["text"], rng)
    split: dict[str, np.ndarray] = {}
    for m in MODALITIES:
        lengths = shared if aligned else random_lengths(n, max(1, steps[m] // 4), steps[m], rng)
        sequences = embed_in_sequences(latents[m], lengths, FEATURE_DIMS[m], rng, world)
        split[m] = _left_pad(sequences, steps[m], FEATURE_DIMS[m])
    _sprinkle_minus_inf(split["audio"], rng)
    # like the real labels (the mean of five annotators' integer scores): multiples of 0.2,
    # so that some are exactly 0 and Acc-2 "non-zero" differs from "with zero"
    split["labels"] = (np.round(target * 5) / 5).reshape(n, 1, 1).astype(np.float32)
    split["id"] = _synthetic_ids(n, index, rng)
    return split


def _left_pad(sequences: list[np.ndarray], steps: int, dim: int) -> np.ndarray:
    """MulT's layout: zeros first, the sequence's (last ``steps``) real steps at the end."""
    values = np.zeros((len(sequences), steps, dim), dtype=np.float32)
    for i, sequence in enumerate(sequences):
        kept = sequence[-steps:]
        values[i, steps - len(kept):] = kept
    return values


def _sprinkle_minus_inf(audio: np.ndarray, rng: np.random.Generator, share: float = 0.05) -> None:
    """Set one feature of about ``share`` of the real audio steps to ``-inf`` (COVAREP's
    log of 0); the other features of such a step stay non-zero, so the step stays real."""
    real = np.argwhere(np.abs(audio).sum(axis=2) > 0)
    chosen = real[rng.random(len(real)) < share]
    audio[chosen[:, 0], chosen[:, 1], rng.integers(0, audio.shape[2], len(chosen))] = -np.inf


def _synthetic_ids(n: int, split_index: int, rng: np.random.Generator) -> np.ndarray:
    """``[n, 3]`` bytes like MulT's: ``"<video>_<clip>"``, start and end time."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    rows = []
    for i in range(n):
        video = "".join(rng.choice(letters, 11))
        start = round(float(rng.uniform(0, 60)), 2)
        end = round(start + float(rng.uniform(1, 8)), 2)
        rows.append((f"{video}_{split_index * 100000 + i + 1}", f"{start}", f"{end}"))
    return np.array(rows, dtype="S")
