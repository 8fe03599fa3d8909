"""IEMOCAP in the MMIN feature layout: reader and synthetic writer.

The layout, as MMIN reads it (github AIM3-RUC/MMIN, ``data/multimodal_dataset.py`` and
``data/multimodal_miss_dataset.py``; the mean/std file as written by the same group's
``normlize_on_trn`` preprocessing script)::

    <root>/A/comparE.h5            utterance id -> dataset [T_a, 130]  (frame-level ComParE)
    <root>/A/comparE_mean_std.h5   group "<fold>" -> datasets "mean" [130], "std" [130]
    <root>/V/denseface.h5          utterance id -> dataset [T_v, 342]
    <root>/L/bert_large.h5         utterance id -> dataset [T_l, 1024]
    <root>/target/<fold>/{trn,val,tst}_label.npy     one-hot [N, 4] (MMIN takes argmax)
    <root>/target/<fold>/{trn,val,tst}_int2name.npy  [N, 1] bytes (MMIN: ``row[0].decode()``)

* the utterance datasets sit at the top level of each h5 file (``h5[utt_id][()]``), keyed
  by ids like ``Ses01F_impro01_F000``; no nested groups;
* ``comparE_mean_std.h5`` holds one group per fold (``str(fold)``) with the per-feature mean
  and std over all frames of that fold's training utterances (std 0 replaced by 1); MMIN's
  ``norm_method='trn'`` computes ``(x - mean) / std`` per frame;
* folds 1..10; MMIN pads a batch with zeros at the end and passes the lengths.

Facts not verified from MMIN's own code (its label-making script is not in the searched
index): the class order. ``CLASSES`` follows IF-MMIN (same features and target files;
``draw.py`` names labels 0..3 happy, angry, sad, neutral), which matches the project notes.
The fold scheme of the writer (fold k: session ``(k + 1) // 2``, one of its two speakers is
the test set, the other the validation set) mirrors the group's MSP-IMPROV script; which
speaker is test in the real IEMOCAP folds is not verified. The dtype of the label files is
not verified either (the writer stores float32 one-hot).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np
import torch

from multimodal_general.datasets.latent_evidence import (
    embed_in_sequences,
    imbalanced_strengths,
    latent_evidence,
    random_lengths,
)
from multimodal_general.datasets.task_data import SPLITS, SequenceSplit, TaskData, pad_sequences
from multimodal_general.errors import BadDataFile, OutputError
from multimodal_general.io import atomic_folder

MODALITIES = ("audio", "vision", "text")
CLASSES = ("happy", "angry", "sad", "neutral")
FOLDS = range(1, 11)
FEATURE_FILES = {"audio": "A/comparE.h5", "vision": "V/denseface.h5", "text": "L/bert_large.h5"}
MEAN_STD_FILE = "A/comparE_mean_std.h5"
FEATURE_DIMS = {"audio": 130, "vision": 342, "text": 1024}
SET_NAMES = {"train": "trn", "valid": "val", "test": "tst"}
DEFAULT_STEPS = {"audio": (20, 80), "vision": (10, 40), "text": (5, 25)}
SESSIONS = 5


# ----------------------------------------------------------------------------- reading


def read_iemocap(
    root: str | Path,
    fold: int = 1,
    normalize_audio: bool = True,
    max_steps: int | None = None,
) -> TaskData:
    """Read one fold of MMIN-layout IEMOCAP into a 4-class :class:`TaskData`.

    Splits train/valid/test come from ``trn``/``val``/``tst``; targets are int64 class
    indices; sequences are zero-padded at the end (``max_steps`` truncates) with masks from
    the real lengths; audio is z-scored with the fold's mean/std when ``normalize_audio``.
    Any problem with the files raises a one-line :class:`BadDataFile`.
    """
    root = Path(root)
    _check_folder(root)
    target_dir = _fold_folder(root, fold)
    feature_paths = {m: _existing_file(root / name) for m, name in FEATURE_FILES.items()}
    mean_std = _mean_std(_existing_file(root / MEAN_STD_FILE), fold) if normalize_audio else None
    if mean_std is not None and mean_std[0].shape[0] != _first_dim(feature_paths["audio"]):
        raise BadDataFile(root / MEAN_STD_FILE, f"fold {fold}: mean/std have "
                                                f"{mean_std[0].shape[0]} features, audio has "
                                                f"{_first_dim(feature_paths['audio'])}")
    handles = {m: _open_h5(path) for m, path in feature_paths.items()}
    try:
        dims: dict[str, int] = {}
        splits = {
            split: _read_split(target_dir, SET_NAMES[split], handles, feature_paths, dims,
                               mean_std, max_steps)
            for split in SPLITS
        }
    finally:
        for handle in handles.values():
            handle.close()
    return TaskData(
        task="iemocap",
        kind="classification",
        modalities=MODALITIES,
        splits=splits,
        classes=CLASSES,
        source=root,
        details={"fold": fold},
    )


def _check_folder(root: Path) -> None:
    if not root.exists():
        raise BadDataFile(root, "no such folder")
    if not root.is_dir():
        raise BadDataFile(root, "not a folder (expected the MMIN feature root with A/, V/, L/, "
                                "target/)")


def _fold_folder(root: Path, fold: int) -> Path:
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or fold not in FOLDS:
        raise BadDataFile(root / "target", f"fold {fold!r} is not one of 1..10")
    folder = root / "target" / str(fold)
    if not folder.is_dir():
        raise BadDataFile(folder, f"no such folder: fold {fold} is not present")
    return folder


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise BadDataFile(path, "no such file" if not path.exists() else "not a file")
    return path


def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise BadDataFile(path, f"not a readable HDF5 file ({error})") from None


def _mean_std(path: Path, fold: int) -> tuple[np.ndarray, np.ndarray]:
    with _open_h5(path) as handle:
        group = handle.get(str(fold))
        if not isinstance(group, h5py.Group) or not {"mean", "std"} <= set(group):
            raise BadDataFile(path, f"has no group '{fold}' with datasets 'mean' and 'std'")
        mean = np.asarray(group["mean"][()], dtype=np.float32).reshape(-1)
        std = np.asarray(group["std"][()], dtype=np.float32).reshape(-1)
    if mean.shape != std.shape or not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise BadDataFile(path, f"fold {fold}: mean and std must be finite and of one shape")
    if (std < 0).any():
        raise BadDataFile(path, f"fold {fold}: std has negative values")
    std[std == 0] = 1.0  # a constant feature, as MMIN's preprocessing does
    return mean, std


def _first_dim(path: Path) -> int | None:
    """The feature size of the first utterance dataset in an h5 file (None if it has none)."""
    with _open_h5(path) as handle:
        for item in handle.values():
            if isinstance(item, h5py.Dataset) and item.ndim == 2:
                return int(item.shape[1])
    return None


def _load_npy(path: Path) -> np.ndarray:
    _existing_file(path)
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise BadDataFile(path, f"not a readable .npy array ({error})") from None


def _names(path: Path) -> list[str]:
    """``[N, 1]`` (MMIN) or ``[N]`` bytes or str -> utterance ids."""
    names = _load_npy(path)
    if names.ndim == 2 and names.shape[1] == 1:
        names = names[:, 0]
    if names.ndim != 1 or names.dtype.kind not in "SU":
        raise BadDataFile(path, f"has shape {names.shape} and dtype {names.dtype}; expected "
                                "[N, 1] or [N] utterance ids (bytes or text)")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names.tolist()]


def _labels(path: Path, count: int, names_file: str) -> torch.Tensor:
    """One-hot ``[N, 4]`` or class indices ``[N]`` -> int64 ``[N]``."""
    labels = _load_npy(path)
    if labels.dtype.kind not in "fiub":
        raise BadDataFile(path, f"has dtype {labels.dtype}, not numbers")
    if len(labels) != count:
        raise BadDataFile(path, f"has {len(labels)} labels but {names_file} names {count} "
                                "utterances")
    classes = len(CLASSES)
    if labels.ndim == 2 and labels.shape[1] == classes:
        one_hot = np.isin(labels, (0, 1)).all() and (labels.sum(axis=1) == 1).all()
        if not one_hot:
            raise BadDataFile(path, "is [N, 4] but not one-hot (each row one 1, the rest 0)")
        return torch.from_numpy(labels.argmax(axis=1).astype(np.int64))
    if labels.ndim == 1 and labels.dtype.kind != "b":
        whole = np.all(np.mod(labels, 1) == 0) if labels.dtype.kind == "f" else True
        if whole and ((labels >= 0) & (labels < classes)).all():
            return torch.from_numpy(labels.astype(np.int64))
        raise BadDataFile(path, f"class indices must be whole numbers in 0..{classes - 1}")
    raise BadDataFile(path, f"has shape {labels.shape}; expected one-hot [N, {classes}] or "
                            "class indices [N]")


def _sequence(handle: h5py.File, path: Path, name: str, names_file: str) -> np.ndarray:
    item = handle.get(name)
    if item is None:
        raise BadDataFile(path, f"has no utterance {name!r} (listed in {names_file})")
    if not isinstance(item, h5py.Dataset):
        raise BadDataFile(path, f"utterance {name!r} is a group, expected a [steps, features] "
                                "dataset")
    values = np.asarray(item[()])
    if values.ndim != 2 or values.dtype.kind not in "fiu":
        raise BadDataFile(path, f"utterance {name!r} has shape {values.shape} and dtype "
                                f"{values.dtype}; expected numeric [steps, features]")
    if not np.isfinite(values).all():
        raise BadDataFile(path, f"utterance {name!r} has NaN or infinite values")
    return values.astype(np.float32, copy=False)


def _read_split(
    target_dir: Path,
    set_name: str,
    handles: dict[str, h5py.File],
    paths: dict[str, Path],
    dims: dict[str, int],
    mean_std: tuple[np.ndarray, np.ndarray] | None,
    max_steps: int | None,
) -> SequenceSplit:
    names_path = target_dir / f"{set_name}_int2name.npy"
    names = _names(names_path)
    target = _labels(target_dir / f"{set_name}_label.npy", len(names), names_path.name)
    if not names:
        raise BadDataFile(names_path, "names no utterances")
    inputs, masks = {}, {}
    for m in MODALITIES:
        sequences = [_sequence(handles[m], paths[m], n, names_path.name) for n in names]
        _check_dims(paths[m], names, sequences, dims.setdefault(m, sequences[0].shape[1]))
        if m == "audio" and mean_std is not None:
            sequences = [(s - mean_std[0]) / mean_std[1] for s in sequences]
        inputs[m], masks[m] = pad_sequences(sequences, max_steps)
    return SequenceSplit(inputs=inputs, masks=masks, target=target, ids=names)


def _check_dims(path: Path, names: list[str], sequences: list[np.ndarray], dim: int) -> None:
    for name, sequence in zip(names, sequences):
        if sequence.shape[1] != dim:
            raise BadDataFile(path, f"utterance {name!r} has {sequence.shape[1]} features per "
                                    f"step, others have {dim}")


# ----------------------------------------------------------------------------- writing


def write_synthetic_iemocap(
    root: str | Path,
    *,
    folds: int = 10,
    utterances: int = 400,
    imbalance: float = 4.0,
    dominant: str = "text",
    strength: float = 2.0,
    steps: Mapping[str, tuple[int, int]] | None = None,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
) -> Path:
    """Write an IEMOCAP-like dataset in the MMIN layout at ``root`` (which must not exist or
    be an empty folder); returns ``root``.

    One pool of ``utterances`` (at least 10, so that every split has some) spread over 10
    speakers (5 sessions x F/M), 4 classes, each modality carrying evidence of the class
    (``dominant`` with ``strength``, the others ``strength / imbalance``). Fold k (1..``folds``): session ``s = (k + 1) // 2`` gives the
    test set (its F speaker for odd k, M for even k) and the validation set (its other
    speaker); train is the other 8 speakers. ``steps``: (low, high) lengths per modality;
    ``dims``: feature sizes (official by default; smaller ones make fast tests). Written into
    a temporary folder next to ``root`` and renamed at the end.
    """
    if not 1 <= folds <= len(FOLDS):
        raise ValueError(f"folds must be 1..10, got {folds}")
    root = Path(root)
    _check_target(root)
    lengths = {**DEFAULT_STEPS, **(steps or {})}
    sizes = {**FEATURE_DIMS, **(dims or {})}
    strengths = imbalanced_strengths(MODALITIES, dominant, strength, imbalance)
    pool = _synthetic_pool(utterances, strengths, lengths, sizes, seed)

    def fill(tmp: Path) -> None:
        _write_features(tmp, pool)
        for fold in range(1, folds + 1):
            _write_fold(tmp, fold, pool)

    return atomic_folder(root, fill)


def _check_target(root: Path) -> None:
    if root.exists() and not (root.is_dir() and not any(root.iterdir())):
        raise OutputError(f"{root}: already exists (give a new or empty folder)")


def _synthetic_pool(
    n: int,
    strengths: dict[str, float],
    lengths: dict[str, tuple[int, int]],
    dims: dict[str, int],
    seed: int,
) -> dict:
    """Ids, speakers, classes and per-modality sequences of every utterance."""
    rng = np.random.default_rng([seed, 1])
    world = np.random.default_rng([seed, 0])
    target, latents = latent_evidence("classification", n, strengths, rng, world,
                                      classes=len(CLASSES))
    speakers = [(1 + (i // 2) % SESSIONS, "FM"[i % 2]) for i in range(n)]
    sequences = {}
    for m in MODALITIES:
        low, high = lengths[m]
        steps = random_lengths(n, low, high, rng)
        sequences[m] = embed_in_sequences(latents[m], steps, dims[m], rng, world)
    offset = 3.0 * world.standard_normal(dims["audio"])  # raw comparE is far from z-scored
    scale = np.exp(world.uniform(-1, 1, dims["audio"]))
    sequences["audio"] = [(s * scale + offset).astype(np.float32) for s in sequences["audio"]]
    return {"ids": _utterance_ids(speakers), "speakers": speakers, "target": target,
            "sequences": sequences}


def _utterance_ids(speakers: list[tuple[int, str]]) -> list[str]:
    """``Ses01F_impro01_F000``-style ids: session, dialog, speaker and a running number."""
    counts: dict[tuple[int, str], int] = {}
    ids = []
    for session, gender in speakers:
        number = counts.get((session, gender), 0)
        counts[(session, gender)] = number + 1
        dialog = 1 + number // 50
        dialog_id = f"Ses{session:02d}{'FM'[dialog % 2]}_impro{dialog:02d}"
        ids.append(f"{dialog_id}_{gender}{number % 50:03d}")
    return ids


def _write_features(root: Path, pool: dict) -> None:
    for m, name in FEATURE_FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as handle:
            for utt, sequence in zip(pool["ids"], pool["sequences"][m]):
                handle[utt] = sequence


def _fold_members(fold: int, speakers: list[tuple[int, str]]) -> dict[str, np.ndarray]:
    session = (fold + 1) // 2
    test_gender = "F" if fold % 2 == 1 else "M"
    members: dict[str, list[int]] = {"trn": [], "val": [], "tst": []}
    for i, (s, gender) in enumerate(speakers):
        split = "trn" if s != session else ("tst" if gender == test_gender else "val")
        members[split].append(i)
    return {k: np.array(v, dtype=np.int64) for k, v in members.items()}


def _write_fold(root: Path, fold: int, pool: dict) -> None:
    folder = root / "target" / str(fold)
    folder.mkdir(parents=True)
    members = _fold_members(fold, pool["speakers"])
    for set_name, index in members.items():
        one_hot = np.eye(len(CLASSES), dtype=np.float32)[pool["target"][index]]
        names = np.array([[pool["ids"][i]] for i in index], dtype="S").reshape(-1, 1)
        np.save(folder / f"{set_name}_label.npy", one_hot)
        np.save(folder / f"{set_name}_int2name.npy", names)
    _append_mean_std(root, fold, [pool["sequences"]["audio"][i] for i in members["trn"]])


def _append_mean_std(root: Path, fold: int, train_audio: list[np.ndarray]) -> None:
    """The fold's per-feature mean and std over all training frames (std 0 -> 1)."""
    frames = np.concatenate(train_audio, axis=0)
    mean, std = frames.mean(axis=0), frames.std(axis=0)
    std[std == 0] = 1.0
    with h5py.File(root / MEAN_STD_FILE, "a") as handle:
        group = handle.create_group(str(fold))
        group["mean"] = mean.astype(np.float32)
        group["std"] = std.astype(np.float32)
