"""Helpers of ``tests/test_predict.py``: the CLI run in-process, edited copies of an
exported model, cases rewritten on other grids, and fake backends whose probabilities are
known functions of the modality mask (or of the image)."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import onnx
from onnx import numpy_helper

from brats_cggm import MODALITIES
from brats_cggm.inference.card import METADATA_KEY, card_path

# --------------------------------------------------------------------------- the CLI


def cli(*args: Any) -> tuple[int, str]:
    """``brats-cggm ARGS`` in this process (as the console script runs it, through
    ``run_app``): its exit status and its stdout + stderr, whitespace-normalised (rich
    wraps long lines at the console width). An exception other than the exit is raised."""
    from brats_cggm import cli as cli_module
    from multimodal_general.cli_support import run_app

    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["brats-cggm", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_app(cli_module.app)
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv = argv
    text = out.getvalue() + "\n" + err.getvalue()
    assert "Traceback" not in text, text
    return code, " ".join(text.split())


# ------------------------------------------------------------------- model copies


def read_card(model_path: Path) -> dict[str, Any]:
    model = onnx.load(model_path)
    return json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])


def copy_model(source: Path, target: Path, edit_card: Callable[[dict], None] | None = None,
               edit_model: Callable[[onnx.ModelProto], None] | None = None,
               beside: str = "same") -> Path:
    """A copy of the exported ``source`` at ``target``: ``edit_card`` changes the card
    (both the embedded one and, with ``beside="same"``, the one beside the file),
    ``edit_model`` the graph; ``beside="keep"`` copies the original card beside it
    unchanged, ``"none"`` writes no card beside it."""
    model = onnx.load(source)
    card = read_card(source)
    if edit_card is not None:
        edit_card(card)
    if edit_model is not None:
        edit_model(model)
    if METADATA_KEY in {p.key for p in model.metadata_props}:
        onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(card)})
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, target)
    if beside == "same":
        card_path(target).write_text(json.dumps(card, indent=1) + "\n")
    elif beside == "keep":
        shutil.copyfile(card_path(source), card_path(target))
    return target


def change_one_weight(model: onnx.ModelProto) -> None:
    """Add 0.01 to one value of the largest float initializer (the card is left alone)."""
    tensor = max((t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT),
                 key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(tensor).copy()
    values.flat[0] += np.float32(0.01)
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))


def drop_card(model: onnx.ModelProto) -> None:
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)


# ------------------------------------------------------------------------- cases


def case_files(folder: Path) -> list[Path]:
    """The four image files of a per-sequence case folder (not its label map)."""
    return sorted(p for p in Path(folder).glob("*.nii.gz") if "seg" not in p.name)


def write_case(folder: Path, case_id: str, arrays: dict[str, np.ndarray], affine: np.ndarray,
               sform_code: int = 1, qform_code: int = 1) -> Path:
    """A brats2021-layout case folder with ``arrays`` on the grid ``affine``."""
    folder = Path(folder) / case_id
    folder.mkdir(parents=True, exist_ok=True)
    for sequence, data in arrays.items():
        image = nib.Nifti1Image(np.asarray(data, dtype=np.int16), affine)
        image.header.set_xyzt_units("mm", "sec")
        image.set_sform(affine, code=sform_code)
        image.set_qform(affine, code=qform_code)
        nib.save(image, folder / f"{case_id}_{sequence}.nii.gz")
    return folder


def affine_from(axes: str, spacing: Sequence[float], origin: Sequence[float], degrees: float = 0.0) -> np.ndarray:
    """Voxel -> RAS+ affine whose array axes point along ``axes`` (e.g. ``"LIA"``), with
    voxel sizes ``spacing`` (mm), a translation and, optionally, a rotation about z."""
    direction = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    rotation = np.eye(3)
    angle = math.radians(degrees)
    rotation[:2, :2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    linear = np.zeros((3, 3))
    for column, (code, size) in enumerate(zip(axes, spacing)):
        row, sign = direction[code]
        linear[row, column] = sign * size
    affine = np.eye(4)
    affine[:3, :3] = rotation @ linear
    affine[:3, 3] = origin
    return affine


# ---------------------------------------------------------------- fake backends


def shapley_by_orderings(game: Callable[[frozenset], float], players: Sequence[str]) -> dict[str, float]:
    """Exact Shapley values as the mean marginal contribution over every ordering of the
    players (another algorithm than the library's subset weights)."""
    values = dict.fromkeys(players, 0.0)
    orderings = list(itertools.permutations(players))
    for ordering in orderings:
        before: frozenset = frozenset()
        for player in ordering:
            values[player] += game(before | {player}) - game(before)
            before = before | {player}
    return {p: v / len(orderings) for p, v in values.items()}


#: probability of TC, WT and ET given the set of sequences switched on: additive terms plus
#: interactions of two and three sequences (Shapley splits an interaction equally among its
#: members; occlusion gives each member all of it; a three-way term also tells Shapley from
#: the Banzhaf value) and a negative term (t1 lowers WT)
GAME_TERMS = {
    "TC": (0.10, {"flair": 0.10, "t1": 0.05, "t1ce": 0.20, "t2": 0.10},
           {("flair", "t2"): 0.20, ("flair", "t1ce", "t2"): 0.12}),
    "WT": (0.10, {"flair": 0.30, "t1": -0.05, "t2": 0.10}, {("flair", "t2"): 0.30}),
    "ET": (0.02, {"t1ce": 0.50}, {("t1", "t1ce"): 0.15}),
}


def game_value(region: str, on: frozenset) -> float:
    base, single, interactions = GAME_TERMS[region]
    return (base + sum(w for s, w in single.items() if s in on)
            + sum(w for members, w in interactions.items() if on.issuperset(members)))


class MaskGame:
    """A backend whose probability of each region is ``game_value`` of the sequences the
    mask switches on, the same at every voxel; counts its calls (numpy in and out, as
    the segmenter's backends)."""

    name = "mask-game"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self.calls += 1
        rows = []
        for row in np.asarray(mask):
            on = frozenset(m for m, flag in zip(MODALITIES, row.tolist()) if flag > 0.5)
            rows.append([game_value(region, on) for region in GAME_TERMS])
        p = np.asarray(rows, dtype=np.float64)
        logits = np.log(p / (1 - p)).astype(np.float32)
        return np.ascontiguousarray(np.broadcast_to(logits[:, :, None, None, None], (*logits.shape, *image.shape[2:])))


class Pointwise:
    """A backend that is a voxel-wise function of the (preprocessed) image, so that it
    commutes with every mirroring: test-time augmentation must not change its output."""

    name = "pointwise"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self.calls += 1
        return 1.5 * image[:, :3] + 0.3 * image[:, 3:4] - 0.2


class EmptyCoalition:
    """Wraps a backend and switches every branch off: its probabilities are v({})."""

    name = "empty-coalition"

    def __init__(self, backend) -> None:
        self.backend = backend

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.backend(image, np.zeros_like(mask))


def strings(value):
    """Every string inside a JSON value (a model card's texts)."""
    if isinstance(value, str):
        yield value
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
        yield from strings(item)
