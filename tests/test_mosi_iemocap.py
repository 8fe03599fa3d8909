"""The CMU-MOSI (MulT pickle) and IEMOCAP (MMIN layout) readers, against files written by
their synthetic writers, and every malformed variant they must refuse in one line."""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from multimodal_general.datasets import iemocap, mosi
from multimodal_general.datasets.iemocap import read_iemocap, write_synthetic_iemocap
from multimodal_general.datasets.mosi import read_mosi, write_synthetic_mosi
from multimodal_general.datasets.task_data import SPLITS, SequenceSplit
from multimodal_general.errors import BadDataFile, OutputError

SMALL_DIMS = {"audio": 16, "vision": 16, "text": 32}
SMALL_STEPS = {"audio": (6, 20), "vision": (4, 12), "text": (3, 10)}


def pooled(split: SequenceSplit, m: str) -> np.ndarray:
    """Masked mean of a modality over its real steps: ``[N, D]``."""
    keep = split.masks[m].unsqueeze(-1).float()
    return ((split.inputs[m] * keep).sum(1) / keep.sum(1).clamp(min=1)).numpy()


def expect_bad(read: Callable[[], object], path: Path, *words: str) -> str:
    with pytest.raises(BadDataFile) as caught:
        read()
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    for word in words:
        assert word in message, message
    return message


# ----------------------------------------------------------------------------- MOSI


@pytest.fixture(scope="module")
def mosi_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("mosi")
    return {
        "aligned": write_synthetic_mosi(folder / "mosi_data.pkl", sizes=(40, 20, 20), steps=12),
        "unaligned": write_synthetic_mosi(
            folder / "mosi_data_noalign.pkl", aligned=False, sizes=(30, 10, 10),
            steps={"text": 10, "audio": 30, "vision": 40}),
    }


def load(path: Path) -> dict:
    with path.open("rb") as handle:
        return pickle.load(handle)


def real_lengths(values: np.ndarray) -> np.ndarray:
    finite = np.where(np.isneginf(values), 0.0, values)
    return (np.abs(finite).sum(axis=2) > 0).sum(axis=1)


def test_mosi_aligned_shapes_masks_and_ids(mosi_files):
    path = mosi_files["aligned"]
    data, raw = read_mosi(path), load(path)
    assert (data.task, data.kind, data.modalities) == ("mosi", "regression", mosi.MODALITIES)
    assert data.details == {"aligned": True} and data.input_dims == mosi.FEATURE_DIMS
    assert raw["train"]["labels"].shape == (40, 1, 1) and raw["train"]["labels"].dtype == np.float32
    assert raw["train"]["id"].shape == (40, 3) and raw["train"]["id"].dtype.kind == "S"
    for name, n in zip(SPLITS, (40, 20, 20)):
        split = data.splits[name]
        assert split.target.shape == (n, 1) and split.target.dtype == torch.float32
        assert split.target.abs().max() <= 3
        assert split.ids == [row[0].decode() for row in raw[name]["id"]]
        for m in mosi.MODALITIES:
            assert split.inputs[m].shape == (n, 12, mosi.FEATURE_DIMS[m])
            assert split.inputs[m].dtype == torch.float32
            lengths = split.masks[m].sum(1).numpy()
            assert (lengths == real_lengths(raw[name][m])).all()
            # MulT pads on the left; in memory the real steps come first, in their order
            assert (split.masks[m].cumprod(1).sum(1).numpy() == lengths).all()
            first = raw[name][m][0][-lengths[0]:]
            expected = np.where(np.isneginf(first), 0, first)
            assert np.allclose(split.inputs[m][0, : lengths[0]].numpy(), expected)
        # aligned: one length per sample for every modality
        assert torch.equal(split.masks["text"], split.masks["audio"])
        assert torch.equal(split.masks["text"], split.masks["vision"])


def test_mosi_unaligned_is_detected(mosi_files):
    data = read_mosi(mosi_files["unaligned"])
    assert data.details == {"aligned": False}
    assert data.summary()["splits"]["train"]["max_steps"] == {"text": 10, "audio": 30, "vision": 40}
    assert not torch.equal(data.splits["train"].masks["audio"].sum(1),
                           data.splits["train"].masks["vision"].sum(1))


def test_mosi_minus_inf_in_audio_becomes_zero(mosi_files):
    path = mosi_files["aligned"]
    raw, data = load(path)["train"]["audio"], read_mosi(path).splits["train"]
    holes = np.isneginf(raw)
    assert holes.any()
    audio = data.inputs["audio"].numpy()
    cleaned = np.where(holes, 0, raw)
    assert np.isfinite(audio).all()
    # the steps are reordered (real steps first), the values of each sample are the same
    for i in range(len(raw)):
        assert np.array_equal(np.sort(audio[i], axis=None), np.sort(cleaned[i], axis=None))


def test_mosi_writer_is_reproducible_and_default_sizes(tmp_path):
    a = load(write_synthetic_mosi(tmp_path / "a.pkl", sizes=(5, 3, 3), steps=4, seed=3))
    b = load(write_synthetic_mosi(tmp_path / "b.pkl", sizes=(5, 3, 3), steps=4, seed=3))
    assert all(np.array_equal(a["test"][k], b["test"][k]) for k in a["test"])
    unaligned = load(write_synthetic_mosi(tmp_path / "u.pkl", aligned=False, sizes=(2, 1, 1)))
    assert {m: unaligned["valid"][m].shape[1:] for m in mosi.MODALITIES} == {
        "text": (50, 300), "audio": (375, 5), "vision": (500, 20)}
    assert not list(tmp_path.glob(".*tmp"))


def test_mosi_dominant_modality_carries_the_signal(tmp_path):
    data = read_mosi(write_synthetic_mosi(tmp_path / "m.pkl", sizes=(600, 300, 1), steps=20))
    train, valid = data.splits["train"], data.splits["valid"]
    y, y_valid = train.target.numpy()[:, 0], valid.target.numpy()[:, 0]
    corr = {}
    for m in mosi.MODALITIES:
        x = pooled(train, m)
        center = x.mean(0)
        a = x - center
        w = np.linalg.solve(a.T @ a + 100 * np.eye(a.shape[1]), a.T @ (y - y.mean()))
        corr[m] = np.corrcoef((pooled(valid, m) - center) @ w, y_valid)[0, 1]
    assert corr["text"] > 0.35, corr
    assert corr["text"] > max(corr["audio"], corr["vision"]) + 0.1, corr


def bad_mosi(tmp_path: Path, source: Path, change: Callable[[dict], object]) -> Path:
    content = load(source)
    changed = change(content)
    path = tmp_path / "bad.pkl"
    with path.open("wb") as handle:
        pickle.dump(content if changed is None else changed, handle)
    return path


def _set(split: str, key: str, make: Callable[[dict], object]) -> Callable[[dict], None]:
    def change(content: dict) -> None:
        content[split][key] = make(content[split])
    return change


def _drop(split: str, key: str | None = None) -> Callable[[dict], None]:
    def change(content: dict) -> None:
        del (content if key is None else content[split])[split if key is None else key]
    return change


def _poison(split: str, key: str, value: float) -> Callable[[dict], None]:
    def change(content: dict) -> None:
        content[split][key][0, -1, 0] = value
    return change


MALFORMED_MOSI = {
    "not a dict": (lambda c: [c["train"]], ["not a dict"]),
    "missing split": (_drop("valid"), ["split 'valid'"]),
    "split not a dict": (lambda c: {**c, "test": [1, 2]}, ["split 'test'", "not a dict"]),
    "missing modality": (_drop("valid", "vision"), ["split 'valid' has no 'vision'"]),
    "missing labels": (_drop("test", "labels"), ["split 'test' has no 'labels'"]),
    "2-D features": (_set("train", "text", lambda s: s["text"][:, 0]), ["'text'", "[samples"]),
    "sample counts": (_set("train", "audio", lambda s: s["audio"][:-1]),
                      ["'audio' has 39 samples", "'labels' has 40"]),
    "dims across splits": (_set("valid", "text", lambda s: np.concatenate(
        [s["text"], s["text"][:, :, :1]], axis=2)), ["split 'valid'", "301 features", "300"]),
    "NaN": (_poison("train", "vision", np.nan), ["'vision'", "NaN"]),
    "+inf": (_poison("test", "audio", np.inf), ["'audio'", "infinite"]),
    "-inf outside audio": (_poison("train", "text", -np.inf), ["'text'", "infinite"]),
    "labels [N]": (_set("train", "labels", lambda s: s["labels"].reshape(-1)),
                   ["(40,)", "[N, 1, 1]", "broadcast"]),
    "labels [N, 2]": (_set("valid", "labels", lambda s: np.repeat(s["labels"][:, 0], 2, 1)),
                      ["(20, 2)", "[N, 1, 1]"]),
    "labels out of range": (_set("test", "labels", lambda s: s["labels"] + 3.5),
                            ["outside [-3, 3]"]),
    "non-numeric labels": (_set("train", "labels", lambda s: s["labels"].astype(str)),
                           ["'labels'", "not a numeric array"]),
    "object features": (_set("train", "vision", lambda s: np.array(list(s["vision"]) + [None],
                                                                   dtype=object)[:-1]),
                        ["'vision'", "not a numeric array"]),
    "ragged list": (_set("train", "text", lambda s: [s["text"][0], s["text"][1][:3]]),
                    ["'text'", "not a numeric array"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_MOSI))
def test_mosi_malformed_files_are_refused(tmp_path, mosi_files, case):
    change, words = MALFORMED_MOSI[case]
    path = bad_mosi(tmp_path, mosi_files["aligned"], change)
    expect_bad(lambda: read_mosi(path), path, *words)


def test_mosi_missing_unreadable_and_folder(tmp_path):
    expect_bad(lambda: read_mosi(tmp_path / "none.pkl"), tmp_path / "none.pkl", "no such file")
    expect_bad(lambda: read_mosi(tmp_path), tmp_path, "not a file")
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"this is not a pickle")
    expect_bad(lambda: read_mosi(junk), junk, "not a readable pickle")


def test_mosi_accepts_labels_n1_other_dims_and_flat_ids(tmp_path, mosi_files):
    def change(content: dict) -> None:
        for split in content.values():
            split["labels"] = split["labels"][:, :, 0]
            split["text"] = split["text"][:, :, :64].copy()
            split["id"] = np.array([row[0].decode() for row in split["id"]])
    path = bad_mosi(tmp_path, mosi_files["aligned"], change)
    data = read_mosi(path)
    assert data.input_dims["text"] == 64 and data.splits["train"].target.shape == (40, 1)
    del_ids = bad_mosi(tmp_path, mosi_files["aligned"], _drop("train", "id"))
    assert read_mosi(del_ids).splits["train"].ids[:2] == ["train/0", "train/1"]


# ----------------------------------------------------------------------------- IEMOCAP


@pytest.fixture(scope="module")
def iemocap_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("iemocap") / "IEMOCAP_features_2021"
    return write_synthetic_iemocap(root, utterances=120, steps=SMALL_STEPS, dims=SMALL_DIMS)


@pytest.fixture
def iemocap_copy(tmp_path, iemocap_root) -> Path:
    return Path(shutil.copytree(iemocap_root, tmp_path / "copy"))


def names_of(root: Path, fold: int, set_name: str) -> list[str]:
    names = np.load(root / "target" / str(fold) / f"{set_name}_int2name.npy")
    return [row[0].decode() for row in names]


def test_iemocap_layout_follows_mmin(iemocap_root):
    names = np.load(iemocap_root / "target/1/trn_int2name.npy")
    labels = np.load(iemocap_root / "target/1/trn_label.npy")
    assert names.ndim == 2 and names.shape[1] == 1 and names.dtype.kind == "S"
    assert labels.shape == (len(names), 4) and (labels.sum(1) == 1).all()
    assert sorted(p.name for p in (iemocap_root / "target").iterdir()) == sorted(
        str(k) for k in range(1, 11))
    with h5py.File(iemocap_root / iemocap.MEAN_STD_FILE, "r") as handle:
        assert set(handle) == {str(k) for k in range(1, 11)}
        assert handle["4"]["mean"].shape == (16,) and handle["4"]["std"].shape == (16,)
    with h5py.File(iemocap_root / "L/bert_large.h5", "r") as handle:
        first = names[0, 0].decode()
        assert first.startswith("Ses") and handle[first].shape[1] == 32


def test_iemocap_reads_a_fold(iemocap_root):
    data = read_iemocap(iemocap_root, fold=2, normalize_audio=False)
    assert (data.task, data.kind) == ("iemocap", "classification")
    assert data.modalities == iemocap.MODALITIES
    assert data.classes == iemocap.CLASSES and data.details == {"fold": 2}
    assert data.input_dims == SMALL_DIMS
    handles = {m: h5py.File(iemocap_root / iemocap.FEATURE_FILES[m], "r") for m in data.modalities}
    try:
        for name, set_name in iemocap.SET_NAMES.items():
            split = data.splits[name]
            assert split.ids == names_of(iemocap_root, 2, set_name)
            one_hot = np.load(iemocap_root / f"target/2/{set_name}_label.npy")
            assert split.target.dtype == torch.int64
            assert (split.target.numpy() == one_hot.argmax(1)).all()
            for m in data.modalities:
                lengths = [handles[m][utt].shape[0] for utt in split.ids]
                assert split.masks[m].sum(1).tolist() == lengths
                assert split.inputs[m].shape[1] == max(lengths)
                assert (split.masks[m].cumprod(1).sum(1) == split.masks[m].sum(1)).all()
                assert (split.inputs[m][~split.masks[m]] == 0).all()
                first = split.ids[0]
                assert np.allclose(split.inputs[m][0, : lengths[0]].numpy(), handles[m][first][()])
    finally:
        for handle in handles.values():
            handle.close()


def test_iemocap_audio_is_normalised_with_the_fold_statistics(iemocap_root):
    data = read_iemocap(iemocap_root, fold=5, max_steps=8)
    train = data.splits["train"]
    assert all(x.shape[1] <= 8 for x in train.inputs.values())
    full = read_iemocap(iemocap_root, fold=5)
    frames = full.splits["train"].inputs["audio"][full.splits["train"].masks["audio"]]
    assert frames.mean(0).abs().max() < 1e-3 and (frames.std(0) - 1).abs().max() < 1e-2
    raw = read_iemocap(iemocap_root, fold=5, normalize_audio=False).splits["train"]
    raw_frames = raw.inputs["audio"][raw.masks["audio"]]
    assert raw_frames.mean(0).abs().max() > 0.5  # the raw features are far from z-scored
    assert (full.splits["valid"].inputs["audio"][~full.splits["valid"].masks["audio"]] == 0).all()


def test_iemocap_folds_are_disjoint_speaker_splits(iemocap_root):
    with h5py.File(iemocap_root / "A/comparE.h5", "r") as handle:
        everyone = set(handle)
    for fold in range(1, 11):
        trn, val, tst = (set(names_of(iemocap_root, fold, s)) for s in ("trn", "val", "tst"))
        assert not (trn & val or trn & tst or val & tst)
        assert trn | val | tst == everyone
        speakers = {s: {(u[3:5], u.split("_")[-1][0]) for u in ids}
                    for s, ids in (("val", val), ("tst", tst), ("trn", trn))}
        session = f"{(fold + 1) // 2:02d}"
        assert len(speakers["val"]) == len(speakers["tst"]) == 1
        assert {s for s, _ in speakers["val"] | speakers["tst"]} == {session}
        assert speakers["val"] != speakers["tst"] and len(speakers["trn"]) == 8


def test_iemocap_dominant_modality_carries_the_signal(tmp_path):
    root = write_synthetic_iemocap(tmp_path / "signal", folds=1, utterances=400,
                                   steps=SMALL_STEPS, dims=SMALL_DIMS)
    data = read_iemocap(root)
    train = data.splits["train"]
    y = train.target.numpy()
    accuracy = {}
    for m in data.modalities:
        centroids = np.stack([pooled(train, m)[y == c].mean(0) for c in range(4)])
        hits = []
        for name in ("valid", "test"):
            x = pooled(data.splits[name], m)
            guess = ((x[:, None] - centroids) ** 2).sum(-1).argmin(1)
            hits.append(guess == data.splits[name].target.numpy())
        accuracy[m] = np.concatenate(hits).mean()
    assert accuracy["text"] > 0.8, accuracy
    assert accuracy["text"] > max(accuracy["audio"], accuracy["vision"]) + 0.2, accuracy


def test_iemocap_writer_refuses_a_used_folder_and_leaves_nothing(tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="already exists"):
        write_synthetic_iemocap(used, utterances=20, folds=1, steps=SMALL_STEPS, dims=SMALL_DIMS)
    empty = tmp_path / "empty"
    empty.mkdir()
    write_synthetic_iemocap(empty, utterances=20, folds=1, steps=SMALL_STEPS, dims=SMALL_DIMS)
    assert (empty / "target/1/tst_label.npy").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "used"]


def _rewrite_h5(path: Path, change: Callable[[h5py.File], None]) -> None:
    with h5py.File(path, "a") as handle:
        change(handle)


def _replace(utt: Callable[[Path], str], make: Callable[[np.ndarray], object]):
    def change(root: Path) -> None:
        name = utt(root)
        def edit(handle: h5py.File) -> None:
            old = handle[name][()]
            del handle[name]
            new = make(old)
            if isinstance(new, np.ndarray):
                handle[name] = new
            else:
                handle.create_group(name)["features"] = old
        _rewrite_h5(root / "L/bert_large.h5", edit)
    return change


def _first_valid(root: Path) -> str:
    return names_of(root, 1, "val")[0]


def _save(relative: str, make: Callable[[np.ndarray], np.ndarray]):
    def change(root: Path) -> None:
        path = root / relative
        np.save(path, make(np.load(path)))
    return change


def _shrink_fold_1(handle: h5py.File) -> None:
    for key in ("mean", "std"):
        values = handle["1"][key][:3]
        del handle["1"][key]
        handle["1"][key] = values


def _two_hot(labels: np.ndarray) -> np.ndarray:
    labels = labels.copy()
    labels[0] = 1
    return labels


MALFORMED_IEMOCAP = {
    "missing feature file": (lambda r: (r / "V/denseface.h5").unlink(), "V/denseface.h5",
                             ["no such file"]),
    "missing labels": (lambda r: (r / "target/1/tst_label.npy").unlink(),
                       "target/1/tst_label.npy", ["no such file"]),
    "missing mean_std": (lambda r: (r / "A/comparE_mean_std.h5").unlink(),
                         "A/comparE_mean_std.h5", ["no such file"]),
    "fold missing": (lambda r: shutil.rmtree(r / "target/1"), "target/1",
                     ["fold 1 is not present"]),
    "fold group missing": (lambda r: _rewrite_h5(r / "A/comparE_mean_std.h5",
                                                  lambda h: h.__delitem__("1")),
                           "A/comparE_mean_std.h5", ["no group '1'"]),
    "mean_std dims": (lambda r: _rewrite_h5(r / "A/comparE_mean_std.h5", _shrink_fold_1),
                      "A/comparE_mean_std.h5", ["mean/std have 3 features, audio has 16"]),
    "not hdf5": (lambda r: (r / "L/bert_large.h5").write_bytes(b"junk"), "L/bert_large.h5",
                 ["not a readable HDF5 file"]),
    "utterance missing": (lambda r: _rewrite_h5(r / "L/bert_large.h5",
                                                lambda h: h.__delitem__(_first_valid(r))),
                          "L/bert_large.h5", ["has no utterance", "val_int2name.npy"]),
    "utterance is a group": (_replace(_first_valid, lambda old: None), "L/bert_large.h5",
                             ["is a group"]),
    "feature dims": (_replace(_first_valid, lambda old: old[:, :5]), "L/bert_large.h5",
                     ["5 features per step", "others have 32"]),
    "non-finite": (_replace(_first_valid, lambda old: old * np.nan), "L/bert_large.h5",
                   ["NaN or infinite"]),
    "pooled 1-D features": (_replace(_first_valid, lambda old: old[0]), "L/bert_large.h5",
                            ["expected numeric [steps, features]"]),
    "not one-hot": (_save("target/1/val_label.npy", _two_hot), "target/1/val_label.npy",
                    ["not one-hot"]),
    "indices out of range": (_save("target/1/trn_label.npy", lambda x: x.argmax(1) + 1),
                             "target/1/trn_label.npy", ["0..3"]),
    "label count": (_save("target/1/tst_label.npy", lambda x: x[:-1]), "target/1/tst_label.npy",
                    ["labels but tst_int2name.npy names"]),
    "label shape": (_save("target/1/tst_label.npy", lambda x: x[:, :3]),
                    "target/1/tst_label.npy", ["one-hot [N, 4]"]),
    "int2name dtype": (_save("target/1/trn_int2name.npy", lambda x: np.zeros(len(x))),
                       "target/1/trn_int2name.npy", ["utterance ids"]),
    "int2name pickled": (lambda r: np.save(r / "target/1/val_int2name.npy",
                                           np.array([{"a": 1}], dtype=object)),
                         "target/1/val_int2name.npy", ["not a readable .npy"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_IEMOCAP))
def test_iemocap_malformed_layouts_are_refused(iemocap_copy, case):
    change, relative, words = MALFORMED_IEMOCAP[case]
    change(iemocap_copy)
    expect_bad(lambda: read_iemocap(iemocap_copy, fold=1), iemocap_copy / relative, *words)


def test_iemocap_class_indices_and_no_normalisation_need_no_mean_std(iemocap_copy):
    (iemocap_copy / "A/comparE_mean_std.h5").unlink()
    _save("target/1/trn_label.npy", lambda x: x.argmax(1))(iemocap_copy)
    data = read_iemocap(iemocap_copy, fold=1, normalize_audio=False)
    one_hot = np.load(iemocap_copy / "target/1/val_label.npy")
    assert (data.splits["valid"].target.numpy() == one_hot.argmax(1)).all()


@pytest.mark.parametrize("fold", [0, 11, "1", True])
def test_iemocap_fold_out_of_range(iemocap_root, fold):
    expect_bad(lambda: read_iemocap(iemocap_root, fold=fold), iemocap_root / "target",
               "is not one of 1..10")


def test_iemocap_missing_root(tmp_path):
    expect_bad(lambda: read_iemocap(tmp_path / "nope"), tmp_path / "nope", "no such folder")
    (tmp_path / "file").write_text("x")
    expect_bad(lambda: read_iemocap(tmp_path / "file"), tmp_path / "file", "not a folder")
