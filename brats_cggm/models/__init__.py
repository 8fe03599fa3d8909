"""The trained models that ship inside the package, found by name.

Each model is an ONNX file with its card beside it (``NAME.onnx`` + ``NAME.card.json``,
package data of this folder, read through :mod:`importlib.resources`), so a wheel install
segments cases with no ``--model``:

>>> from brats_cggm import models
>>> [m.name for m in models.available()]
['brats_cggm_fourbranch', 'brats_cggm_phantom_demo', 'brats_cggm_real']
>>> models.default().name                     # what predict, evaluate and the app use
'brats_cggm_real'
>>> models.resolve("brats_cggm_phantom_demo")  # a name or a path -> the file to load

A model's card says what it does (``task``, default ``segmentation``), so models of another
task (a brain-extraction network, say) and cards that describe several networks (an
ensemble) join by adding their files here and, for a new default, a line to
:data:`DEFAULTS`. ``brats-cggm models`` lists them and prints a card.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from brats_cggm.errors import IncompatibleModel

#: the model each task uses when none is named; BRATS_CGGM_MODEL (a name or a path)
#: overrides the segmentation default
DEFAULTS = {"segmentation": "brats_cggm_real"}
ENVIRONMENT_VARIABLE = "BRATS_CGGM_MODEL"
CARD_SUFFIX = ".card.json"


@dataclass(frozen=True)
class ShippedModel:
    """One model of the package: its name, its ONNX file and its card."""

    name: str
    path: Path

    @property
    def card_path(self) -> Path:
        return self.path.with_name(self.name + CARD_SUFFIX)

    @cached_property
    def card(self) -> dict[str, Any]:
        """The card beside the file (the copy inside the ONNX metadata is checked on load)."""
        try:
            return json.loads(self.card_path.read_text())
        except (OSError, ValueError) as error:
            raise IncompatibleModel(f"{self.card_path}: the shipped model's card is unreadable ({error})") from None

    @property
    def task(self) -> str:
        return str(self.card.get("task", "segmentation"))

    @property
    def is_default(self) -> bool:
        return DEFAULTS.get(self.task) == self.name


def folder() -> Path:
    """Where the shipped files lie (a folder of the installed package)."""
    return Path(str(resources.files(__name__)))


def available() -> list[ShippedModel]:
    """Every shipped model (an ONNX file with a card beside it), by name."""
    files = sorted(folder().glob("*.onnx"))
    return [ShippedModel(f.stem, f) for f in files if f.with_name(f.stem + CARD_SUFFIX).is_file()]


def find(name: str) -> ShippedModel:
    """The shipped model called ``name``; an :class:`IncompatibleModel` naming the choices otherwise."""
    for model in available():
        if model.name == name:
            return model
    known = ", ".join(m.name for m in available()) or "none"
    raise IncompatibleModel(f"{name}: no such file, and no shipped model has that name (shipped: {known})")


def default(task: str = "segmentation") -> ShippedModel:
    """The model ``task`` uses when none is named."""
    return find(DEFAULTS[task])


def resolve(model: str | Path | None) -> Path:
    """The file or run folder to load for ``model``: an existing path as it is, a shipped
    model's name as its ONNX file; ``None`` means ``$BRATS_CGGM_MODEL`` or the default."""
    if model is None:
        model = os.environ.get(ENVIRONMENT_VARIABLE) or default().name
    path = Path(model)
    if path.exists() or len(path.parts) > 1 or path.suffix == ".onnx":
        return path
    return find(str(model)).path


__all__ = ["DEFAULTS", "ShippedModel", "available", "default", "find", "folder", "resolve"]
