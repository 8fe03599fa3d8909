"""UPMC-Food 101's official JSON layout: the splits, their records and image files.

On disk a root folder holds ``train.json``, ``dev.json`` and ``test.json``, each a JSON list of
``{"id", "text_tokens": [...], "img_path", "label": <class name>}`` (extra keys such as
``text_path`` are ignored). ``img_path`` is relative to the root (an absolute path is used as
it is; if it does not exist, its tail from the last ``images/`` folder is tried under the
root, so a moved dataset still reads). The splits map to ``train`` / ``valid`` / ``test``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from multimodal_general.errors import BadDataFile

MODALITIES = ("text", "image")
SPLIT_FILES = {"train": "train.json", "valid": "dev.json", "test": "test.json"}
REQUIRED_KEYS = ("id", "text_tokens", "img_path", "label")


# ----------------------------------------------------------------------------- reading


@dataclass
class Food101Split:
    """One split's samples, in file order."""

    ids: list[str]
    texts: list[str]  # the tokens joined with single spaces
    images: list[Path]  # absolute
    labels: np.ndarray  # int64 indices into Food101Records.classes

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Food101Records:
    """What the three JSON files say, checked: ``splits`` keyed ``train`` / ``valid`` / ``test``."""

    root: Path
    classes: tuple[str, ...]
    splits: dict[str, Food101Split]


def read_food101(root: str | Path, *, check_images: bool = True) -> Food101Records:
    """Read and check ``train.json``, ``dev.json`` and ``test.json`` under ``root``.

    ``classes`` are the sorted class names of ``train.json``; a dev/test label outside them,
    a malformed entry, a duplicate id or a missing image file raises :class:`BadDataFile`
    naming the JSON file.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise BadDataFile(root, "no such folder (expected train.json, dev.json, test.json)")
    entries = {split: _read_entries(root / name) for split, name in SPLIT_FILES.items()}
    train_path = root / SPLIT_FILES["train"]
    if not entries["train"]:
        raise BadDataFile(train_path, "holds no samples")
    classes = tuple(sorted({entry["label"] for entry in entries["train"]}))
    splits = {
        split: _make_split(root, root / SPLIT_FILES[split], items, classes, check_images)
        for split, items in entries.items()
    }
    return Food101Records(root, classes, splits)


def _read_json(path: Path) -> object:
    """A JSON file's value; a missing or unparsable file is a :class:`BadDataFile`."""
    if not path.is_file():
        raise BadDataFile(path, "no such file")
    try:
        with path.open("rb") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError) as error:
        raise BadDataFile(path, f"cannot read ({error})") from None
    except json.JSONDecodeError as error:
        raise BadDataFile(path, f"not JSON ({error.msg} at line {error.lineno})") from None


def _read_entries(path: Path) -> list[dict]:
    """The checked entries of one split file: every key present, tokens and label strings."""
    value = _read_json(path)
    if not isinstance(value, list):
        raise BadDataFile(path, f"expected a JSON list of samples, found {type(value).__name__}")
    for index, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise BadDataFile(path, f"entry {index} is a {type(entry).__name__}, not an object")
        for key in REQUIRED_KEYS:
            if key not in entry:
                raise BadDataFile(path, f"entry {index} has no {key!r} key")
        tokens = entry["text_tokens"]
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise BadDataFile(path, f"entry {index}: 'text_tokens' is not a list of strings")
        for key in ("label", "img_path"):
            if not isinstance(entry[key], str) or not entry[key]:
                raise BadDataFile(path, f"entry {index}: {key!r} is not a non-empty string")
        if not isinstance(entry["id"], (str, int)):
            raise BadDataFile(path, f"entry {index}: 'id' is not a string")
    return value


def _make_split(
    root: Path, path: Path, entries: list[dict], classes: tuple[str, ...], check_images: bool
) -> Food101Split:
    """Labels to indices, image paths made absolute, ids and images checked."""
    index_of = {name: i for i, name in enumerate(classes)}
    ids, texts, images, labels = [], [], [], []
    first_entry: dict[str, int] = {}
    for index, entry in enumerate(entries):
        sample_id = str(entry["id"])
        if sample_id in first_entry:
            raise BadDataFile(
                path, f"duplicate id {sample_id!r} (entries {first_entry[sample_id]} and {index})"
            )
        first_entry[sample_id] = index
        if entry["label"] not in index_of:
            raise BadDataFile(
                path, f"entry {index}: unknown class name {entry['label']!r} (not in train.json)"
            )
        ids.append(sample_id)
        texts.append(" ".join(entry["text_tokens"]))
        images.append(_image_path(root, entry["img_path"]))
        labels.append(index_of[entry["label"]])
    if check_images:
        _check_images(path, images)
    return Food101Split(ids, texts, images, np.asarray(labels, dtype=np.int64))


def _image_path(root: Path, img_path: str) -> Path:
    """``img_path`` under ``root``; a stale absolute path falls back to its ``images/`` tail."""
    path = root / img_path  # an absolute img_path replaces root
    if Path(img_path).is_absolute() and not path.exists():
        parts = Path(img_path).parts
        if "images" in parts:
            tail = parts[len(parts) - 1 - parts[::-1].index("images"):]
            moved = root.joinpath(*tail)
            if moved.exists():
                return moved
    return path


def _check_images(path: Path, images: Sequence[Path]) -> None:
    """Every image file exists, or one line naming the first missing one and the count."""
    missing = [image for image in images if not image.is_file()]
    if missing:
        raise BadDataFile(
            path,
            f"{len(missing)} of {len(images)} image files are missing, the first: {missing[0]}",
        )
