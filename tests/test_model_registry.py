"""The shipped models, found by name (brats_cggm.models): what `predict`, `evaluate` and the
app load when no --model is given, what a name or a path resolves to, and `brats-cggm models`."""

from __future__ import annotations

import json
import re

import pytest
from inference_cases import cli, strings

from brats_cggm import models
from brats_cggm.errors import IncompatibleModel
from brats_cggm.inference.card import read_onnx

SHIPPED = {"brats_cggm_real", "brats_cggm_fourbranch", "brats_cggm_phantom_demo"}


def test_every_shipped_model_has_a_card_that_its_file_carries():
    found = models.available()
    assert {m.name for m in found} == SHIPPED
    for model in found:
        assert model.path.parent == models.folder() and model.card_path.is_file()
        assert read_onnx(model.path)[1] == model.card, model.name  # the card beside = the card inside
        assert model.task == "segmentation"


#: a path of the machine that built a model: absolute (POSIX, home, Windows drive), anywhere in a text
MACHINE_PATH = re.compile(r"(?:^|[\s'\"=(])(?:/[\w.-]+/|~/|[A-Za-z]:[\\/])")


@pytest.mark.parametrize("text, is_path", [("/work/shared/data/real", True), ("data=/home/me/x", True),
                                           ("C:\\data\\x", True), ("~/runs/x", True), ("brats-cggm-model-card/1", False),
                                           ("python bench/real_cv.py --data DATA", False), ("1/2 of the cases", False)])
def test_what_counts_as_a_machine_path(text, is_path):
    assert bool(MACHINE_PATH.search(text)) == is_path


def test_no_shipped_card_holds_a_path_of_the_machine_that_built_it():
    for model in models.available():
        found = [text for text in strings(model.card) if MACHINE_PATH.search(text)]
        assert not found, f"{model.name}: {found}"


def test_the_default_is_the_real_data_model():
    assert models.default().name == "brats_cggm_real" and models.default().is_default
    assert not models.find("brats_cggm_phantom_demo").is_default


def test_resolve_takes_a_name_a_path_or_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("BRATS_CGGM_MODEL", raising=False)
    demo = models.find("brats_cggm_phantom_demo").path
    assert models.resolve(None) == models.default().path
    assert models.resolve("brats_cggm_phantom_demo") == demo
    assert models.resolve(demo) == demo
    assert models.resolve(tmp_path / "run") == tmp_path / "run"  # a path is left to the loader to refuse
    assert models.resolve("missing.onnx").name == "missing.onnx"
    monkeypatch.setenv("BRATS_CGGM_MODEL", "brats_cggm_phantom_demo")
    assert models.resolve(None) == demo
    monkeypatch.setenv("BRATS_CGGM_MODEL", str(tmp_path / "mine.onnx"))
    assert models.resolve(None) == tmp_path / "mine.onnx"


def test_an_unknown_name_is_one_line_naming_the_shipped_models(monkeypatch):
    with pytest.raises(IncompatibleModel, match=r"^bogus: no such file, and no shipped model has that name "
                                                r"\(shipped: brats_cggm_fourbranch, brats_cggm_phantom_demo, brats_cggm_real\)$"):
        models.resolve("bogus")
    code, output = cli("predict", "--model", "bogus", "--input", "nowhere", "--out", "nowhere")
    assert code == 2 and "no shipped model has that name" in output and "Traceback" not in output


def test_the_models_command_lists_them_and_prints_a_card():
    code, listed = cli("models")
    assert code == 0 and "brats_cggm_real (default)" in listed and "brats_cggm_phantom_demo" in listed, listed
    code, shown = cli("models", "brats_cggm_phantom_demo")
    assert code == 0, shown
    path, card = shown.split(" ", 2)[1:]
    assert path == str(models.find("brats_cggm_phantom_demo").path)
    assert json.loads(card) == models.find("brats_cggm_phantom_demo").card
    code, output = cli("models", "bogus")
    assert code == 2 and "no shipped model has that name" in output
