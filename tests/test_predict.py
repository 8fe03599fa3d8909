"""Inference: the segmenter (ONNX Runtime and torch backends), model-card refusals, the
input's grid kept in every output, missing sequences, contribution maps, and
``brats-cggm predict`` on folders and files.

One tiny run (sequence dropout 0.25, 2 epochs) is trained and exported once for the
session (conftest's ``tiny_export``, shared with tests/test_export.py); a copy of its ONNX file whose card says ``sequence_dropout: 0`` stands for a model
trained without dropout (only the metadata changes, so the graph digest still matches).
Most CLI calls run in this process (``inference_cases.cli``); one runs the console script.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from inference_cases import (
    EmptyCoalition,
    MaskGame,
    Pointwise,
    affine_from,
    case_files,
    change_one_weight,
    cli,
    copy_model,
    drop_card,
    game_value,
    read_card,
    shapley_by_orderings,
    write_case,
)
from training_cases import error_line, run_cli

from brats_cggm import MODALITIES
from brats_cggm.data.labels import REGIONS
from brats_cggm.data.layouts import discover
from brats_cggm.data.phantom import generate_case, write_phantoms
from brats_cggm.errors import ConfigurationError, IncompatibleModel
from brats_cggm.inference.card import card_path
from brats_cggm.inference.contributions import coalition_plan, region_shares
from brats_cggm.inference.inputs import case_from_files
from brats_cggm.inference.outputs import write_prediction
from brats_cggm.inference.postprocessing import Postprocessing
from brats_cggm.inference.segmenter import Segmenter

BRATS2021_VALUES = {0, 1, 2, 4}
BRATS2023_VALUES = {0, 1, 2, 3}


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_export):
    """The trained run and its ONNX export (conftest's ``tiny_export``, shared with
    tests/test_export.py: read-only), a no-dropout copy of the export, and this module's
    folder for inputs and outputs."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("predict")
    nodrop = copy_model(tiny_export.onnx, root / "models" / "nodrop.onnx",
                        edit_card=lambda card: card["network"].update(sequence_dropout=0.0))
    return SimpleNamespace(root=root, train=tiny_export.train, run=tiny_export.run, onnx=tiny_export.onnx,
                           nodrop=nodrop)


@pytest.fixture(scope="module")
def inputs(models):
    """Phantom cases to predict (none of them seen in training), one folder per layout."""
    root = models.root / "inputs"
    write_phantoms(root / "brats2021", 2, size=32, layout="brats2021", seed=1)
    write_phantoms(root / "brats2023", 1, size=32, layout="brats2023", seed=2)
    write_phantoms(root / "msd", 1, size=32, layout="msd", seed=3)
    return root


@pytest.fixture(scope="module")
def segmenter(models):
    torch.set_num_threads(1)
    return Segmenter.load(models.onnx)


@pytest.fixture(scope="module")
def predicted_2021(models, inputs):
    """``brats-cggm predict`` on the brats2021 folder (BraTS 2021 numbering, with
    probabilities and Shapley contribution maps)."""
    out = models.root / "out_2021"
    code, text = cli("predict", "--input", inputs / "brats2021", "--out", out, "--model", models.onnx,
                     "--probabilities", "--contributions", "--method", "shapley")
    assert code == 0, text
    return out


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def load_labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def case_outputs(out: Path, case_id: str) -> list[str]:
    """Every file in ``out`` that belongs to ``case_id`` (temporary files included)."""
    return sorted(p.name for p in Path(out).glob("*") if case_id in p.name) if Path(out).exists() else []


def check_summary(summary: dict, labels_file: Path, values: set[int]) -> None:
    """The JSON agrees with the label map it describes."""
    image = nib.load(labels_file)
    labels = np.asarray(image.dataobj)
    assert labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) <= values
    assert summary["shape"] == list(labels.shape)
    voxel_ml = abs(np.linalg.det(image.affine[:3, :3])) / 1000
    volumes = summary["volumes_ml"]
    assert volumes["WT"] == pytest.approx(np.count_nonzero(labels) * voxel_ml, abs=1e-3)
    et_value = 3 if values == BRATS2023_VALUES else 4
    assert volumes["ET"] == pytest.approx(np.count_nonzero(labels == et_value) * voxel_ml, abs=1e-3)
    assert volumes["TC"] == pytest.approx(np.count_nonzero(np.isin(labels, (1, et_value))) * voxel_ml, abs=1e-3)
    for value in values - {0}:
        name = [k for k in volumes if k.startswith(f"label {value} ")]
        assert len(name) == 1 and volumes[name[0]] == pytest.approx(np.count_nonzero(labels == value) * voxel_ml, abs=1e-3)


# ------------------------------------------------------------ 1. end to end, CLI


@pytest.mark.parametrize("layout", ["brats2021", "brats2023", "msd"])
def test_predict_a_folder_in_each_layout(layout, models, inputs, predicted_2021):
    if layout == "brats2021":
        out = predicted_2021
    else:
        out = models.root / f"out_{layout}"
        code, text = cli("predict", "--input", inputs / layout, "--out", out, "--model", models.onnx)
        assert code == 0, text
        assert "1 case(s) segmented" in text
    cases = discover(inputs / layout).cases
    assert len(cases) == (2 if layout == "brats2021" else 1)
    for case in cases:
        summary = read_json(out / f"{case.case_id}.json")
        labels_file = out / f"{case.case_id}.nii.gz"
        check_summary(summary, labels_file, BRATS2021_VALUES)
        assert summary["case_id"] == case.case_id and summary["label_scheme"] == "brats2021"
        assert summary["sequences_used"] == list(MODALITIES) and summary["sequences_missing"] == []
        assert summary["model"]["graph_sha256"] == read_card(models.onnx)["graph_sha256"]
        source = nib.load(case.images[0])
        assert nib.load(labels_file).shape == source.shape[:3]  # msd: the 4-D file's grid
        assert np.allclose(nib.load(labels_file).affine, source.affine, atol=1e-5)
        assert summary["volumes_ml"]["WT"] > 0  # the tiny model does segment something


def test_predict_the_four_files_of_one_case(models, inputs, predicted_2021):
    folder = inputs / "brats2021" / "BraTS2021_00000"
    files = case_files(folder)
    assert len(files) == 4
    out = models.root / "out_files"
    args = [a for f in files for a in ("--input", f)]
    code, text = cli("predict", *args, "--out", out, "--model", models.onnx)
    assert code == 0, text
    assert sorted(p.name for p in out.iterdir()) == ["BraTS2021_00000.json", "BraTS2021_00000.nii.gz"]
    summary = read_json(out / "BraTS2021_00000.json")
    check_summary(summary, out / "BraTS2021_00000.nii.gz", BRATS2021_VALUES)
    assert summary["sequences_used"] == list(MODALITIES)
    assert summary["inputs"] == {m: str(folder / f"BraTS2021_00000_{m}.nii.gz") for m in MODALITIES}
    # the same case as found in its folder: the same label map
    assert np.array_equal(load_labels(out / "BraTS2021_00000.nii.gz"),
                          load_labels(predicted_2021 / "BraTS2021_00000.nii.gz"))


def test_the_case_id_of_brats2023_files_is_the_case_folder_name(inputs):
    """BUG: all four BraTS 2023 suffixes start with "t" (t2f, t1n, t1c, t2w), and the
    common prefix of the stems keeps that "t"."""
    files = case_files(inputs / "brats2023" / "BraTS-GLI-00000-000")
    assert case_from_files(files).case_id == "BraTS-GLI-00000-000"


def test_the_case_id_of_files_without_flair_is_the_case_name(inputs):
    """BUG: t1, t1ce and t2 share the prefix ``_t``."""
    files = [f for f in case_files(inputs / "brats2021" / "BraTS2021_00000") if "flair" not in f.name]
    assert case_from_files(files).case_id == "BraTS2021_00000"


def test_label_scheme_brats2023_numbers_et_3_on_the_same_voxels(models, inputs, predicted_2021):
    out = models.root / "out_2023_scheme"
    code, text = cli("predict", "--input", inputs / "brats2021", "--out", out, "--model", models.onnx,
                     "--label-scheme", "brats2023")
    assert code == 0, text
    for case_id in ("BraTS2021_00000", "BraTS2021_00001"):
        old = load_labels(predicted_2021 / f"{case_id}.nii.gz")
        new = load_labels(out / f"{case_id}.nii.gz")
        assert (old == 4).any(), "no ET voxel: the test would prove nothing"
        assert set(np.unique(new).tolist()) <= BRATS2023_VALUES
        assert np.array_equal(new == 3, old == 4)
        assert np.array_equal(np.where(old == 4, 3, old), new)
        summary = read_json(out / f"{case_id}.json")
        check_summary(summary, out / f"{case_id}.nii.gz", BRATS2023_VALUES)
        assert summary["label_scheme"] == "brats2023" and summary["labels"]["3"].endswith("(ET)")
        before = read_json(predicted_2021 / f"{case_id}.json")["volumes_ml"]
        assert {r: summary["volumes_ml"][r] for r in REGIONS} == {r: before[r] for r in REGIONS}
    code, text = cli("predict", "--input", inputs / "brats2021", "--out", out, "--model", models.onnx,
                     "--label-scheme", "msd")
    assert code == 2 and "--label-scheme must be one of brats2021, brats2023" in text


# ------------------------------------------------------------ 2. ONNX vs torch


def test_onnx_and_torch_backends_agree(models, inputs, segmenter):
    torch_segmenter = Segmenter.load(models.run)
    assert torch_segmenter.backend.name == "torch" and segmenter.backend.name == "onnxruntime"
    for case in discover(inputs / "brats2021").cases:
        a = segmenter.predict_case(case, contributions="occlusion")
        b = torch_segmenter.predict_case(case, contributions="occlusion")
        assert a.labels.shape == b.labels.shape
        assert np.mean(a.labels == b.labels) > 0.999
        assert np.abs(a.probabilities - b.probabilities).max() <= 1e-3
        for sequence in MODALITIES:
            assert np.abs(a.contributions[sequence] - b.contributions[sequence]).max() <= 1e-3
    # a sequence switched off goes through the modality mask of both backends alike
    case = generate_case(7, 32)
    arrays = {m: case.images[m] for m in ("flair", "t1ce", "t2")}
    a = segmenter.predict_arrays(arrays, case.affine)
    b = torch_segmenter.predict_arrays(arrays, case.affine)
    assert np.mean(a.labels == b.labels) > 0.999 and np.abs(a.probabilities - b.probabilities).max() <= 1e-3
    # and through the CLI, with --model RUN_DIR
    out = models.root / "out_torch"
    code, text = cli("predict", "--input", inputs / "brats2021", "--out", out, "--model", models.run)
    assert code == 0, text
    onnx_out = models.root / "out_onnx_plain"
    code, text = cli("predict", "--input", inputs / "brats2021", "--out", onnx_out, "--model", models.onnx)
    assert code == 0, text
    for case_id in ("BraTS2021_00000", "BraTS2021_00001"):
        assert np.mean(load_labels(out / f"{case_id}.nii.gz") == load_labels(onnx_out / f"{case_id}.nii.gz")) > 0.999
        assert read_json(out / f"{case_id}.json")["model"]["source"].endswith("best.pt")


def test_a_cards_postprocessing_applies_from_onnx_as_from_the_run_folder(models, inputs, segmenter, tmp_path):
    """The rules in an exported card (numpy chain) and the same rules given to the run folder
    (MONAI chain, torch) clean alike; ``--postprocessing off`` gives the plain map back."""
    rules = {"WT": {"min_fraction_of_largest": 0.5}, "ET": {"min_ml": 0.001}, "small_et_ml": 1e6}
    carried = copy_model(models.onnx, tmp_path / "clean.onnx", edit_card=lambda card: card.update(postprocessing=rules))
    (tmp_path / "rules.json").write_text(json.dumps(rules))
    from_card, from_run = Segmenter.load(carried), Segmenter.load(models.run, postprocessing=tmp_path / "rules.json")
    assert from_card.postprocessing == from_run.postprocessing == Postprocessing.from_dict(rules)
    assert Segmenter.load(carried, postprocessing="off").postprocessing is None and segmenter.postprocessing is None
    for case in discover(inputs / "brats2021").cases:
        plain, a, b = segmenter.predict_case(case), from_card.predict_case(case), from_run.predict_case(case)
        expected, applied = Postprocessing.from_dict(rules)(plain.labels, plain.affine)
        assert np.array_equal(a.labels, expected) and a.summary()["postprocessing"] == applied
        assert plain.summary()["postprocessing"] is None
        assert np.mean(a.labels == b.labels) > 0.999 and b.postprocessing["rules"] == applied["rules"]
        assert applied["small_et_relabelled"] or not (plain.labels == 4).any()
    out = tmp_path / "out"
    code, text = cli("predict", "--input", inputs / "brats2021", "--out", out, "--model", carried,
                     "--postprocessing", "off")
    assert code == 0, text
    assert read_json(out / "BraTS2021_00000.json")["postprocessing"] is None


def test_a_cards_tta_is_the_default_and_the_options_override_it(models, inputs, segmenter, tmp_path):
    """``inference.tta`` in the card switches mirroring on unless told otherwise (``tta=False`` /
    ``--no-tta``); a card whose ``tta`` is not true or false is refused."""
    with_tta = copy_model(models.onnx, tmp_path / "tta.onnx", edit_card=lambda card: card["inference"].update(tta=True))
    case = discover(inputs / "brats2021").cases[0]
    mirrored, told = Segmenter.load(with_tta).predict_case(case), Segmenter.load(with_tta, tta=False).predict_case(case)
    assert mirrored.tta and not told.tta and not segmenter.tta
    assert np.array_equal(mirrored.probabilities, segmenter.predict_case(case, tta=True).probabilities)
    assert np.array_equal(told.probabilities, segmenter.predict_case(case).probabilities)
    out = tmp_path / "out"
    code, text = cli("predict", "--input", inputs / "brats2021", "--out", out, "--model", with_tta, "--no-tta")
    assert code == 0, text
    assert "tta.onnx: one network, no mirroring (TTA off), no clean-up" in " ".join(text.split())
    assert read_json(out / "BraTS2021_00000.json")["tta"] is False
    broken = copy_model(models.onnx, tmp_path / "broken.onnx", edit_card=lambda card: card["inference"].update(tta="yes"))
    with pytest.raises(IncompatibleModel, match="tta 'yes' is not true or false"):
        Segmenter.load(broken)


# ------------------------------------------------------------ 3. geometry


GEOMETRIES = {
    # array axes along left, inferior, anterior; anisotropic voxels; sform "aligned", qform "scanner"
    "Geo_00000": {"affine": affine_from("LIA", (1.3, 0.9, 2.1), (12.5, -30.25, 40.75)), "sform_code": 2, "qform_code": 1},
    # LPS, coarser than the model's 7.5 mm in z, rotated 20 degrees; sform "MNI", qform "aligned"
    "Geo_00001": {"affine": affine_from("LPS", (6.5, 4.5, 10.5), (-80.0, 95.5, -12.0), degrees=20), "sform_code": 4, "qform_code": 2},
}


@pytest.fixture(scope="module")
def odd_grids(models):
    """Two cases that are neither RAS nor 1 mm, on a non-cubic grid (30 x 26 x 20)."""
    phantom = generate_case(11, 32)
    arrays = {m: phantom.images[m][:30, 2:28, 4:24] for m in MODALITIES}
    folder = models.root / "inputs" / "geometry"
    for case_id, geometry in GEOMETRIES.items():
        write_case(folder, case_id, arrays, **geometry)
    return folder


def test_every_output_keeps_the_input_grid_and_header_codes(models, odd_grids):
    out = models.root / "out_geometry"
    code, text = cli("predict", "--input", odd_grids, "--out", out, "--model", models.onnx,
                     "--probabilities", "--contributions")
    assert code == 0, text
    for case_id, geometry in GEOMETRIES.items():
        source = nib.load(odd_grids / case_id / f"{case_id}_t1.nii.gz")
        assert "".join(nib.aff2axcodes(source.affine)) != "RAS"
        names = [f"{case_id}.nii.gz", f"{case_id}_probabilities.nii.gz",
                 *(f"{case_id}_contribution_{m}.nii.gz" for m in MODALITIES)]
        assert sorted(case_outputs(out, case_id)) == sorted([*names, f"{case_id}.json"])
        for name in names:
            image = nib.load(out / name)
            expected_shape = (30, 26, 20) if name == f"{case_id}.nii.gz" else (30, 26, 20, 3)
            assert image.shape == expected_shape, name
            assert np.allclose(image.affine, source.affine, atol=1e-5), name
            assert np.allclose(image.get_sform(), source.get_sform(), atol=1e-5), name
            assert np.allclose(image.get_qform(), source.get_qform(), atol=1e-5), name
            assert int(image.header["sform_code"]) == geometry["sform_code"], name
            assert int(image.header["qform_code"]) == geometry["qform_code"], name
            assert image.header.get_xyzt_units()[0] == "mm", name
        summary = read_json(out / f"{case_id}.json")
        assert summary["voxel_size_mm"] == pytest.approx(np.linalg.norm(geometry["affine"][:3, :3], axis=0), abs=1e-5)
        assert summary["shape"] == [30, 26, 20]


def test_predict_arrays_carries_the_affine_over(models, odd_grids, segmenter, tmp_path):
    case_id = "Geo_00001"
    case = discover(odd_grids).cases[1]
    assert case.case_id == case_id
    from_file = segmenter.predict_case(case)
    source = nib.load(case.images[0])
    arrays = {m: np.asarray(nib.load(p).dataobj) for m, p in zip(MODALITIES, case.images)}
    prediction = segmenter.predict_arrays(arrays, source.affine, case_id="arrays")
    assert prediction.shape == (30, 26, 20) and prediction.probabilities.shape == (3, 30, 26, 20)
    assert np.allclose(prediction.affine, source.affine, atol=1e-5)
    assert np.allclose(prediction.probabilities, from_file.probabilities, atol=1e-6)
    assert np.array_equal(prediction.labels, from_file.labels)
    assert prediction.inputs == dict.fromkeys(MODALITIES, "array")
    write_prediction(prediction, tmp_path)
    written = nib.load(tmp_path / "arrays.nii.gz")
    assert written.shape == (30, 26, 20) and np.allclose(written.affine, source.affine, atol=1e-5)
    assert np.array_equal(np.asarray(written.dataobj), prediction.labels)


# ------------------------------------------------------------ 4. model cards


def _modalities(card):
    card["modalities"] = ["flair", "t1", "t1ce"]


def _scheme(card):
    card["label_scheme"] = "brats2030"


REFUSALS = {
    "three_sequences": ("the model takes 3 sequence(s)", {"edit_card": _modalities}),
    "unknown_scheme": ("unknown label scheme 'brats2030'", {"edit_card": _scheme}),
    "tampered_weights": ("the weights do not match the digest", {"edit_model": change_one_weight, "beside": "keep"}),
    "card_beside_disagrees": ("disagrees with the model card inside", {}),
    "no_card": ("no model card in the ONNX metadata", {"edit_model": drop_card, "beside": "none"}),
    "not_onnx": ("not an ONNX model", None),
}


def refused_model(models, kind: str, folder: Path) -> tuple[Path, Path]:
    """A broken copy of the model; returns it and the file the message must name."""
    path = folder / f"{kind}.onnx"
    options = REFUSALS[kind][1]
    if options is None:
        path.write_bytes(b"this is not an ONNX model\n")
        return path, path
    copy_model(models.onnx, path, **options)
    if kind == "card_beside_disagrees":
        card = json.loads(card_path(path).read_text())
        card["description"] = "edited by hand"
        card_path(path).write_text(json.dumps(card))
        return path, card_path(path)
    if kind == "tampered_weights":  # the card itself is intact and still matches
        assert read_card(path) == read_card(models.onnx) == json.loads(card_path(path).read_text())
    return path, path


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_a_model_whose_card_cannot_be_honoured_is_refused(kind, models, inputs, tmp_path):
    expected, _ = REFUSALS[kind]
    path, named = refused_model(models, kind, tmp_path)
    with pytest.raises(IncompatibleModel) as refusal:
        Segmenter.load(path)
    message = str(refusal.value)
    assert "\n" not in message and str(named) in message and expected in message, message
    out = tmp_path / "out"
    code, text = cli("predict", "--input", inputs / "brats2021", "--out", out, "--model", path)
    assert code == 2, text
    assert f"error: {message}" in text
    assert not out.exists() or not any(out.iterdir())


def test_the_console_script_refuses_with_one_line_and_status_2(models, inputs, tmp_path):
    path, _ = refused_model(models, "tampered_weights", tmp_path)
    result = run_cli("predict", "--input", inputs / "brats2021", "--out", tmp_path / "out", "--model", path)
    line = error_line(result)  # exit 2, one line, no traceback
    assert str(path) in line and "do not match the digest" in line
    assert not (tmp_path / "out").exists()


def test_an_unchanged_copy_is_accepted(models, tmp_path):
    path = copy_model(models.onnx, tmp_path / "copy.onnx")
    assert Segmenter.load(path).card == read_card(models.onnx)


# ------------------------------------------------------------ 5. missing sequences


@pytest.fixture(scope="module")
def partial_folder(models, inputs):
    """The brats2021 cases, the second without its t1 file."""
    folder = models.root / "inputs" / "partial"
    shutil.copytree(inputs / "brats2021", folder)
    (folder / "BraTS2021_00001" / "BraTS2021_00001_t1.nii.gz").unlink()
    return folder


def test_a_dropout_model_predicts_a_case_without_t1(models, partial_folder):
    out = models.root / "out_partial"
    code, text = cli("predict", "--input", partial_folder, "--out", out, "--model", models.onnx, "--contributions")
    assert code == 0, text
    summary = read_json(out / "BraTS2021_00001.json")
    check_summary(summary, out / "BraTS2021_00001.nii.gz", BRATS2021_VALUES)
    assert summary["sequences_used"] == ["flair", "t1ce", "t2"]
    assert summary["sequences_missing"] == ["t1"]
    assert summary["inputs"]["t1"] is None
    assert set(summary["contributions"]["shares"]["WT"]) == {"flair", "t1ce", "t2"}
    assert not (out / "BraTS2021_00001_contribution_t1.nii.gz").exists()
    assert (out / "BraTS2021_00001_contribution_flair.nii.gz").exists()
    assert read_json(out / "BraTS2021_00000.json")["sequences_used"] == list(MODALITIES)


def test_a_model_without_dropout_needs_all_four_sequences(models, partial_folder):
    out = models.root / "out_partial_nodrop"
    code, text = cli("predict", "--input", partial_folder, "--out", out, "--model", models.nodrop)
    assert code == 1, text
    assert "failed: BraTS2021_00001: t1 missing" in text and "it needs all four sequences" in text
    assert "1 case(s) failed" in text
    assert case_outputs(out, "BraTS2021_00001") == []
    assert (out / "BraTS2021_00000.nii.gz").exists() and (out / "BraTS2021_00000.json").exists()
    nodrop = Segmenter.load(models.nodrop)
    assert not nodrop.allows_missing and Segmenter.load(models.onnx).allows_missing
    case = generate_case(7, 32)
    with pytest.raises(IncompatibleModel, match=r"^arrays7: t1, t2 missing, .*needs all four sequences"):
        nodrop.predict_arrays({m: case.images[m] for m in ("flair", "t1ce")}, case.affine, case_id="arrays7")


# ------------------------------------------------------------ 6. contributions


def test_coalition_plans_by_hand():
    occlusion = coalition_plan([True, True, True, True], "occlusion")
    assert occlusion.masks.shape == (5, 4) and occlusion.full == 0 and occlusion.masks[0].all()
    assert occlusion.sequences == MODALITIES
    assert [tuple(np.flatnonzero(~m)) for m in occlusion.masks[1:]] == [(0,), (1,), (2,), (3,)]
    assert np.array_equal(occlusion.weights, np.hstack([np.ones((4, 1)), -np.eye(4)]))
    partial = coalition_plan([True, False, True, True], "occlusion")
    assert partial.masks.shape == (4, 4) and partial.sequences == ("flair", "t1ce", "t2")
    assert not partial.masks[:, 1].any()

    # k = 2 (flair, t2): phi_flair = 1/2 [v(f) - v({})] + 1/2 [v(f, t2) - v(t2)]
    shapley = coalition_plan([True, False, False, True], "shapley")
    assert [tuple(np.flatnonzero(m)) for m in shapley.masks] == [(), (0,), (3,), (0, 3)]
    assert shapley.full == 3 and shapley.sequences == ("flair", "t2")
    assert np.allclose(shapley.weights, [[-0.5, 0.5, -0.5, 0.5], [-0.5, -0.5, 0.5, 0.5]])
    # k = 3: w(0) = 1/3, w(1) = 1/6, w(2) = 1/3; phi_flair over (), f, t1ce, t2, f+t1ce, f+t2, t1ce+t2, all
    three = coalition_plan([True, False, True, True], "shapley")
    assert three.masks.shape == (8, 4)
    row = dict(zip([tuple(np.flatnonzero(m)) for m in three.masks], three.weights[0]))
    assert row == pytest.approx({(): -1 / 3, (0,): 1 / 3, (2,): -1 / 6, (3,): -1 / 6,
                                 (0, 2): 1 / 6, (0, 3): 1 / 6, (2, 3): -1 / 3, (0, 2, 3): 1 / 3})
    for plan in (shapley, three, coalition_plan([True] * 4, "shapley")):
        k = len(plan.sequences)
        assert plan.masks.shape[0] == 2 ** k and plan.masks[plan.full].sum() == k
        assert np.allclose(plan.weights.sum(axis=1), 0)  # each phi_i is a difference of values
        efficiency = np.zeros(2 ** k)  # sum_i phi_i = v(all present) - v({})
        efficiency[plan.full], efficiency[0] = 1, -1
        assert np.allclose(plan.weights.sum(axis=0), efficiency)
    alone = coalition_plan([True, True, False, True], None)
    assert alone.masks.tolist() == [[True, True, False, True]] and alone.sequences == ()
    with pytest.raises(ConfigurationError, match="unknown contribution method 'lime'"):
        coalition_plan([True] * 4, "lime")


def game_segmenter(card: dict, backend) -> Segmenter:
    return Segmenter(backend=backend, card=card, source="fake")


def game_arrays(present, shape=(12, 10, 9)):
    """Arrays on the card's own grid (7.5 mm, RAS) with no zero voxel: no resampling,
    no crop; the maps come back constant."""
    rng = np.random.default_rng(0)
    return {m: rng.uniform(50, 100, shape).astype(np.float32) for m in present}, np.diag([7.5, 7.5, 7.5, 1.0])


@pytest.mark.parametrize("present", [MODALITIES, ("flair", "t1ce", "t2"), ("flair", "t1", "t2")])
@pytest.mark.parametrize("method", ["occlusion", "shapley"])
def test_contributions_of_a_known_game_are_exact(method, present, segmenter):
    backend = MaskGame()
    arrays, affine = game_arrays(present)
    prediction = game_segmenter(segmenter.card, backend).predict_arrays(arrays, affine, contributions=method)
    on = frozenset(present)
    assert backend.calls == (1 + len(present) if method == "occlusion" else 2 ** len(present))  # one window
    assert prediction.sequences_used == tuple(present) and tuple(prediction.contributions) == tuple(present)
    for r, region in enumerate(REGIONS):
        assert np.allclose(prediction.probabilities[r], game_value(region, on), atol=1e-5)
        if method == "shapley":
            expected = shapley_by_orderings(lambda coalition, region=region: game_value(region, coalition), present)
        else:
            expected = {s: game_value(region, on) - game_value(region, on - {s}) for s in present}
        for sequence in present:
            assert np.allclose(prediction.contributions[sequence][r], expected[sequence], atol=1e-5), (region, sequence)
        if method == "shapley":  # efficiency
            total = sum(prediction.contributions[s][r] for s in present)
            assert np.allclose(total, game_value(region, on) - game_value(region, frozenset()), atol=1e-5)
    # shares: positive contributions inside the region, normalised; empty region -> all 0
    shares = prediction.shares()
    for r, region in enumerate(REGIONS):
        inside = game_value(region, on) > 0.5
        assert prediction.regions[r].all() == inside and prediction.regions[r].any() == inside
        values = shares[region]
        if not inside:
            assert values == dict.fromkeys(present, 0.0)
            continue
        positive = {s: max(float(prediction.contributions[s][r].flat[0]), 0.0) for s in present}
        assert values == pytest.approx({s: v / sum(positive.values()) for s, v in positive.items()}, abs=1e-5)
        assert sum(values.values()) == pytest.approx(1.0)
    if "t1" in present:  # t1 lowers WT: a negative contribution, no share
        assert (prediction.contributions["t1"][1] < 0).all() and shares["WT"]["t1"] == 0.0


def test_shapley_maps_of_the_trained_model_add_up(segmenter, inputs):
    """Efficiency on the real network: sum_i phi_i = p(all present) - p(no sequence),
    with p(no sequence) from the same network with every branch switched off."""
    empty = Segmenter(EmptyCoalition(segmenter.backend), segmenter.card, "empty")
    for case in discover(inputs / "brats2021").cases:
        prediction = segmenter.predict_case(case, contributions="shapley")
        nothing = empty.predict_case(case).probabilities
        total = sum(prediction.contributions.values())
        assert np.abs(total - (prediction.probabilities - nothing)).max() <= 1e-4
        assert np.abs(total).max() > 1e-3  # the sequences do matter
        for maps in prediction.contributions.values():
            assert maps.shape == (3, *prediction.shape) and maps.dtype == np.float32
            assert np.isfinite(maps).all() and -1 <= maps.min() and maps.max() <= 1
        occlusion = segmenter.predict_case(case, contributions="occlusion")
        assert np.allclose(occlusion.probabilities, prediction.probabilities, atol=1e-6)
        for maps in occlusion.contributions.values():
            assert -1 <= maps.min() and maps.max() <= 1
        for values in region_shares(prediction.contributions, prediction.regions).values():
            assert all(0 <= v <= 1 for v in values.values())
            assert sum(values.values()) == pytest.approx(1.0) or not any(values.values())


def test_contribution_files_hold_the_maps(inputs, segmenter, predicted_2021):
    for case in discover(inputs / "brats2021").cases:
        summary = read_json(predicted_2021 / f"{case.case_id}.json")
        contributions = summary["contributions"]
        assert contributions["method"] == "shapley"
        expected = segmenter.predict_case(case, contributions="shapley")
        source = nib.load(case.images[0])
        for sequence in MODALITIES:
            name = f"{case.case_id}_contribution_{sequence}.nii.gz"
            assert summary["files"]["contributions"][sequence] == name
            image = nib.load(predicted_2021 / name)
            assert image.shape == (*source.shape, 3)
            assert np.allclose(image.affine, source.affine, atol=1e-5)
            data = np.moveaxis(np.asarray(image.dataobj), -1, 0)
            assert np.allclose(data, expected.contributions[sequence], atol=1e-6)
        probabilities = np.moveaxis(np.asarray(nib.load(predicted_2021 / f"{case.case_id}_probabilities.nii.gz").dataobj), -1, 0)
        assert np.allclose(probabilities, expected.probabilities, atol=1e-6)
        for region in REGIONS:
            shares = contributions["shares"][region]
            assert set(shares) == set(MODALITIES) and all(0 <= v <= 1 for v in shares.values())
            assert sum(shares.values()) == pytest.approx(1.0) or not any(shares.values())
        for region, shares in expected.shares().items():
            assert contributions["shares"][region] == pytest.approx(shares)


# ------------------------------------------------------------ 7. batches


@pytest.fixture(scope="module")
def batch_folder(models, inputs):
    """The two brats2021 cases and a third whose t2 file is cut in half."""
    folder = models.root / "inputs" / "batch"
    shutil.copytree(inputs / "brats2021", folder)
    broken = folder / "BraTS2021_00005"
    shutil.copytree(models.train / "BraTS2021_00005", broken)
    t2 = broken / "BraTS2021_00005_t2.nii.gz"
    data = t2.read_bytes()
    t2.write_bytes(data[: len(data) // 2])
    return folder


def test_a_batch_skips_done_cases_redoes_them_on_overwrite_and_survives_a_broken_case(models, batch_folder):
    out = models.root / "out_batch"
    args = ("predict", "--input", batch_folder, "--out", out, "--model", models.onnx, "--probabilities")
    code, text = cli(*args)
    assert code == 1, text
    broken = batch_folder / "BraTS2021_00005" / "BraTS2021_00005_t2.nii.gz"
    assert f"failed: {broken}: is truncated" in text
    assert "2 case(s) segmented" in text and "1 case(s) failed" in text
    assert case_outputs(out, "BraTS2021_00005") == []  # nothing half-written
    assert not list(out.glob(".*"))  # no temporary files left
    good = ("BraTS2021_00000", "BraTS2021_00001")
    for case_id in good:
        assert case_outputs(out, case_id) == sorted([f"{case_id}.json", f"{case_id}.nii.gz", f"{case_id}_probabilities.nii.gz"])
    stamps = {p: p.stat().st_mtime_ns for p in out.iterdir()}

    code, text = cli(*args)
    assert code == 1, text
    assert "skipped 2 case(s) already in" in text and "segmented" not in text
    assert f"failed: {broken}" in text
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    code, text = cli(*args, "--overwrite")
    assert code == 1, text
    assert "2 case(s) segmented" in text and "skipped" not in text
    assert all(p.stat().st_mtime_ns != stamp for p, stamp in stamps.items())
    assert set(out.iterdir()) == set(stamps)

    shutil.rmtree(batch_folder / "BraTS2021_00005")
    code, text = cli(*args)
    assert code == 0 and "skipped 2 case(s)" in text, text


def test_a_case_whose_outputs_cannot_all_be_written_leaves_none(models, inputs, tmp_path):
    """The label map is written first; when a later file fails (a folder in the way of the
    probabilities), the label map goes again and no JSON marks the case done."""
    out = tmp_path / "out"
    (out / "BraTS2021_00000_probabilities.nii.gz").mkdir(parents=True)
    code, text = cli("predict", "--input", inputs / "brats2021", "--out", out, "--model", models.onnx, "--probabilities")
    assert code == 1, text
    assert f"failed: {out / 'BraTS2021_00000_probabilities.nii.gz'}: cannot write" in text
    assert case_outputs(out, "BraTS2021_00000") == ["BraTS2021_00000_probabilities.nii.gz"]  # only the folder
    assert not any(p.name.startswith(".") for p in out.iterdir())
    assert (out / "BraTS2021_00001.json").exists() and (out / "BraTS2021_00001_probabilities.nii.gz").is_file()


def test_a_folder_that_is_not_a_case_is_named_in_the_report(models, inputs, tmp_path):
    """BUG: the problems ``find_cases`` returns (here a case folder with only a label map)
    count as failures, but the CLI never prints them: the user reads "1 case(s) failed"
    and cannot tell which."""
    folder = tmp_path / "cases"
    shutil.copytree(inputs / "brats2021" / "BraTS2021_00000", folder / "BraTS2021_00000")
    lonely = folder / "BraTS2021_00009"
    lonely.mkdir()
    shutil.copyfile(inputs / "brats2021" / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz", lonely / "BraTS2021_00009_seg.nii.gz")
    code, text = cli("predict", "--input", folder, "--out", tmp_path / "out", "--model", models.onnx)
    assert code == 1, text
    assert (tmp_path / "out" / "BraTS2021_00000.json").exists()
    assert "BraTS2021_00009" in text, text


# ------------------------------------------------------------ 8. TTA


def test_tta_on_a_small_case(segmenter, inputs):
    case = discover(inputs / "brats2021").cases[0]
    plain = segmenter.predict_case(case)
    mirrored = segmenter.predict_case(case, tta=True)
    assert mirrored.tta and mirrored.labels.shape == plain.labels.shape == (32, 32, 32)
    assert mirrored.probabilities.shape == plain.probabilities.shape
    assert 0 <= mirrored.probabilities.min() and mirrored.probabilities.max() <= 1
    assert np.abs(mirrored.probabilities - plain.probabilities).max() > 1e-6  # the mirrorings did run
    assert np.mean(mirrored.labels == plain.labels) > 0.5


def test_tta_leaves_a_mirror_symmetric_model_unchanged(segmenter):
    """A voxel-wise backend commutes with every flip: each mirrored window, flipped back,
    is the plain one, so the 8-fold average equals the plain prediction."""
    arrays, _ = game_arrays(MODALITIES, shape=(14, 11, 9))
    affine = affine_from("LPS", (5.0, 6.0, 9.0), (3.0, 2.0, 1.0))
    backend = Pointwise()
    fake = game_segmenter(segmenter.card, backend)
    plain = fake.predict_arrays(arrays, affine)
    calls = backend.calls
    mirrored = fake.predict_arrays(arrays, affine, tta=True, contributions="occlusion")
    assert backend.calls - calls == 8 * 5 * calls  # 8 mirrorings x (1 + 4) coalitions per window
    assert np.allclose(mirrored.probabilities, plain.probabilities, atol=1e-5)
    assert np.array_equal(mirrored.labels, plain.labels)
    assert len(np.unique(plain.labels)) > 1  # the map is not trivially uniform


@pytest.mark.parametrize("shape", [(20, 30, 70), (16, 16, 16), (100, 90, 49), (47, 200, 13)])
def test_the_window_count_is_monais(shape):
    from monai.inferers import sliding_window_inference

    from brats_cggm.inference.windows import window_count

    seen = []
    sliding_window_inference(torch.zeros(1, 1, *shape), (16, 16, 16), 3,
                             lambda x: seen.append(x.shape[0]) or x, overlap=0.5)
    assert window_count(shape, (16, 16, 16), 0.5) == sum(seen)


def test_progress_reaches_every_window(segmenter, inputs):
    case = discover(inputs / "brats2021").cases[0]
    calls = []
    segmenter.predict_case(case, progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1][0] == calls[-1][1] and [d for d, _ in calls] == sorted(d for d, _ in calls)
