"""UPMC-Food 101: the JSON reader, its errors, feature extraction with tiny local models,
the feature cache and the synthetic writer's signal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from multimodal_general.datasets.food101 import (
    extract_features,
    load_food101,
    read_food101,
    write_random_encoders,
    write_synthetic_food101,
)
from multimodal_general.datasets.food101 import features as food101
from multimodal_general.errors import BadDataFile, ConfigurationError, OutputError

CLASSES = 4
PER_CLASS = (30, 10, 10)
TEXT_TOKENS = 24
HIDDEN = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("food") / "food101"
    return write_synthetic_food101(root, classes=CLASSES, per_class=PER_CLASS, image_size=32,
                                   seed=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    pytest.importorskip("transformers", reason="needs the 'food' extra")
    return write_random_encoders(tmp_path_factory.mktemp("models"), hidden=HIDDEN, image_size=32)


@pytest.fixture(scope="module")
def features(dataset, models) -> tuple[Path, list[tuple[int, int]]]:
    calls: list[tuple[int, int]] = []
    folder = extract_features(dataset, *models, text_tokens=TEXT_TOKENS, batch_size=64,
                              progress=lambda done, total: calls.append((done, total)))
    return folder, calls


def _copy(dataset: Path, tmp_path: Path) -> Path:
    ignore = shutil.ignore_patterns("features")
    return Path(shutil.copytree(dataset, tmp_path / "copy", ignore=ignore))


def _entries(root: Path, name: str) -> list[dict]:
    return json.loads((root / name).read_text())


def _write(root: Path, name: str, value) -> None:
    (root / name).write_text(json.dumps(value))


# ----------------------------------------------------------------------------- reader


def test_reader_reads_the_synthetic_layout(dataset):
    records = read_food101(dataset)
    assert records.classes == tuple(sorted(records.classes)) and len(records.classes) == CLASSES
    assert {k: len(v) for k, v in records.splits.items()} == dict(
        zip(("train", "valid", "test"), (CLASSES * n for n in PER_CLASS), strict=True))
    for split, name in (("train", "train.json"), ("valid", "dev.json")):
        entries, got = _entries(dataset, name), records.splits[split]
        assert got.ids == [e["id"] for e in entries]
        assert got.texts[0] == " ".join(entries[0]["text_tokens"])
        assert [records.classes[i] for i in got.labels] == [e["label"] for e in entries]
        assert got.labels.dtype == np.int64
        assert all(p.is_absolute() and p.is_file() for p in got.images)
    assert _entries(dataset, "train.json")[0]["img_path"].startswith("images/train/")
    assert np.bincount(records.splits["train"].labels).tolist() == [PER_CLASS[0]] * CLASSES


def test_a_stale_absolute_img_path_falls_back_to_the_root(dataset, tmp_path):
    root = _copy(dataset, tmp_path)
    entries = _entries(root, "test.json")
    for entry in entries:
        entry["img_path"] = "/gone/elsewhere/UPMC_Food101/" + entry["img_path"]
    _write(root, "test.json", entries)
    images = read_food101(root).splits["test"].images
    assert images[0] == root / _entries(dataset, "test.json")[0]["img_path"]


def _missing_file(root: Path) -> str:
    (root / "dev.json").unlink()
    return "dev.json"


def _not_json(root: Path) -> str:
    (root / "test.json").write_text("[{]")
    return "test.json"


def _not_a_list(root: Path) -> str:
    _write(root, "train.json", {"samples": []})
    return "train.json"


def _missing_key(root: Path) -> str:
    entries = _entries(root, "test.json")
    del entries[2]["label"]
    _write(root, "test.json", entries)
    return "test.json"


def _bad_tokens(root: Path) -> str:
    entries = _entries(root, "train.json")
    entries[1]["text_tokens"] = "a whole sentence"
    _write(root, "train.json", entries)
    return "train.json"


def _unknown_class(root: Path) -> str:
    entries = _entries(root, "dev.json")
    entries[3]["label"] = "moon_cheese"
    _write(root, "dev.json", entries)
    return "dev.json"


def _missing_images(root: Path) -> str:
    for entry in _entries(root, "test.json")[4:6]:
        (root / entry["img_path"]).unlink()
    return "test.json"


def _duplicate_id(root: Path) -> str:
    entries = _entries(root, "train.json")
    entries[5]["id"] = entries[0]["id"]
    _write(root, "train.json", entries)
    return "train.json"


@pytest.mark.parametrize("break_it, words", [
    (_missing_file, "no such file"),
    (_not_json, "not JSON"),
    (_not_a_list, "expected a JSON list"),
    (_missing_key, "entry 2 has no 'label' key"),
    (_bad_tokens, "entry 1: 'text_tokens' is not a list of strings"),
    (_unknown_class, "unknown class name 'moon_cheese'"),
    (_missing_images, "2 of 40 image files are missing, the first:"),
    (_duplicate_id, "entries 0 and 5"),
])
def test_malformed_files_are_one_line_errors_naming_the_file(dataset, tmp_path, break_it, words):
    root = _copy(dataset, tmp_path)
    name = break_it(root)
    with pytest.raises(BadDataFile) as caught:
        read_food101(root)
    assert caught.value.path == root.resolve() / name
    assert words in str(caught.value) and "\n" not in str(caught.value)
    if break_it is _missing_images:
        assert _entries(root, "test.json")[4]["img_path"] in str(caught.value)


# ----------------------------------------------------------------------------- extraction


def test_extraction_shapes_dtypes_masks_and_progress(dataset, features):
    folder, calls = features
    records = read_food101(dataset)
    total = sum(len(s) for s in records.splits.values())
    assert folder.parent == dataset.resolve() / "features"
    assert calls[-1] == (total, total) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["classes"] == list(records.classes)
    assert manifest["settings"] == {"text_tokens": TEXT_TOKENS, "image_tokens": "cls+grid4"}
    assert np.load(folder / "train_text.npy").dtype == np.float16
    assert np.load(folder / "train_image.npy").dtype == np.float16

    data = load_food101(dataset, *features_models(manifest), text_tokens=TEXT_TOKENS)
    assert data.task == "food101" and data.kind == "classification"
    assert data.modalities == ("text", "image") and data.classes == records.classes
    assert data.input_dims == {"text": HIDDEN, "image": HIDDEN}
    for name, split in data.splits.items():
        n, rec = len(records.splits[name]), records.splits[name]
        text, image = split.inputs["text"], split.inputs["image"]
        assert text.shape == (n, TEXT_TOKENS, HIDDEN) and text.dtype == torch.float16
        assert image.shape == (n, 17, HIDDEN) and image.dtype == torch.float16
        assert split.masks["image"].all()
        words = torch.tensor([len(t.split()) for t in rec.texts])
        assert torch.equal(split.masks["text"].sum(1), (words + 2).clamp(max=TEXT_TOKENS))
        assert text[~split.masks["text"]].abs().sum() == 0  # zero-padded
        assert split.target.dtype == torch.int64 and split.target.tolist() == rec.labels.tolist()
        assert split.ids == rec.ids


def features_models(manifest: dict) -> tuple[str, str]:
    return manifest["models"]["bert"]["path"], manifest["models"]["vit"]["path"]


def test_the_cache_is_reused_without_running_the_models(dataset, models, features, monkeypatch):
    folder, _ = features
    stamp = (folder / "train_text.npy").stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("the models were loaded although the cache is valid")

    monkeypatch.setattr(food101, "_load_models", refuse)
    assert extract_features(dataset, *models, text_tokens=TEXT_TOKENS) == folder
    cached = load_food101(dataset, text_tokens=TEXT_TOKENS)  # no models: found by settings
    assert cached.details["features"] == str(folder)
    assert (folder / "train_text.npy").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigurationError, match="give --bert and --vit"):
        load_food101(dataset, text_tokens=TEXT_TOKENS + 1)


def test_a_damaged_cache_is_rebuilt_and_other_settings_get_their_own(dataset, models, tmp_path):
    folder = extract_features(dataset, *models, tmp_path, text_tokens=8, image_tokens="cls+grid2")
    assert folder.parent == tmp_path
    assert np.load(folder / "test_image.npy").shape == (CLASSES * PER_CLASS[2], 5, HIDDEN)
    (folder / "valid_text.npy").unlink()
    assert extract_features(dataset, *models, tmp_path, text_tokens=8,
                            image_tokens="cls+grid2") == folder
    assert (folder / "valid_text.npy").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_bad_settings_are_configuration_errors(dataset, models, tmp_path):
    with pytest.raises(ConfigurationError, match="image_tokens"):
        extract_features(dataset, *models, image_tokens="patches")
    with pytest.raises(ConfigurationError, match="text_tokens"):
        extract_features(dataset, *models, text_tokens=0)
    with pytest.raises(ConfigurationError, match="exceeds the BERT model's 64 positions"):
        extract_features(dataset, *models, tmp_path, text_tokens=100)
    with pytest.raises(ConfigurationError, match="unknown Food-101 settings"):
        load_food101(dataset, text_token=8)


def test_a_folder_that_is_not_a_model_is_a_one_line_error(dataset, models, tmp_path):
    bert, vit = models
    with pytest.raises(BadDataFile) as caught:
        extract_features(dataset, tmp_path / "nothing", vit, tmp_path)
    assert caught.value.path == tmp_path / "nothing"
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.json").write_text('{"hello": 1}')
    (fake / "model.safetensors").write_bytes(b"not weights")
    for wrong_bert, wrong_vit in ((fake, vit), (vit, vit), (bert, bert)):
        with pytest.raises(BadDataFile) as caught:
            extract_features(dataset, wrong_bert, wrong_vit, tmp_path)
        message = str(caught.value)
        assert "\n" not in message and "not a saved" in message, message
        assert caught.value.path in (wrong_bert, wrong_vit)


def test_an_unreadable_image_names_the_image(dataset, models, tmp_path):
    root = _copy(dataset, tmp_path)
    image = root / _entries(root, "dev.json")[0]["img_path"]
    image.write_bytes(b"\x89PNG but not really")
    with pytest.raises(BadDataFile) as caught:
        extract_features(root, *models)
    assert caught.value.path == image.resolve() and "cannot read image" in str(caught.value)
    assert not (root / "features").exists() or not any((root / "features").iterdir())


def test_no_cache_and_no_models_is_a_configuration_error(dataset, tmp_path):
    root = _copy(dataset, tmp_path)
    with pytest.raises(ConfigurationError, match="no cached features.*give --bert and --vit"):
        load_food101(root)


# ----------------------------------------------------------------------------- signal


def _masked_mean(split, modality: str) -> torch.Tensor:
    mask = split.masks[modality].unsqueeze(2).float()
    return (split.inputs[modality] * mask).sum(1) / mask.sum(1).clamp(min=1)


def _logistic_accuracy(train_x, train_y, test_x, test_y, classes: int) -> float:
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    layer = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(train_x), train_y)
        loss = loss + 1e-2 * layer.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return (layer(test_x).argmax(1) == test_y).float().mean().item()


def test_the_text_features_carry_the_class_signal(dataset, features):
    torch.manual_seed(0)
    data = load_food101(dataset, text_tokens=TEXT_TOKENS)
    train, dev = data.splits["train"], data.splits["valid"]
    accuracy = _logistic_accuracy(_masked_mean(train, "text"), train.target,
                                  _masked_mean(dev, "text"), dev.target, CLASSES)
    assert accuracy > 1 / CLASSES + 0.2, accuracy


# ----------------------------------------------------------------------------- writer


def test_the_writer_is_deterministic_and_refuses_a_full_folder(dataset, tmp_path):
    again = write_synthetic_food101(tmp_path / "again", classes=CLASSES, per_class=PER_CLASS,
                                    image_size=32, seed=1)
    assert _entries(again, "train.json") == _entries(dataset, "train.json")
    with pytest.raises(OutputError, match="already exists"):
        write_synthetic_food101(again, classes=CLASSES)
    with pytest.raises(ConfigurationError):
        write_synthetic_food101(tmp_path / "bad", dominant="audio")
