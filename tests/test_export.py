"""ONNX export of a trained run: graph check, parity with torch, model card, CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from inference_cases import cli, strings

from brats_cggm import models
from brats_cggm.errors import ConfigurationError
from brats_cggm.export import (
    PARITY_TOLERANCE,
    card_path,
    export_run,
    weights_sha256,
)
from brats_cggm.inference.card import ONNX_FIELDS
from brats_cggm.inference.segmenter import Segmenter
from brats_cggm.training.trained import load_run

SHIPPED_CARD = models.default().card_path


@pytest.fixture(scope="module")
def trained(tiny_export):
    """The tiny run of conftest's ``tiny_export`` (2 epochs on 6 phantoms), shared with
    tests/test_predict.py."""
    torch.set_num_threads(1)
    return tiny_export.run


@pytest.fixture(scope="module")
def exported(tiny_export):
    """Its export by ``export_run(run, out, parity_cases=1)`` and the card that returned."""
    return tiny_export.onnx, tiny_export.card


def test_the_graph_passes_the_checker_and_carries_its_card(exported, trained):
    out, card = exported
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["image", "modality_mask"]
    assert [o.name for o in model.graph.output] == ["logits"]
    embedded = json.loads({p.key: p.value for p in model.metadata_props}["model_card"])
    assert embedded == json.loads(card_path(out).read_text()) == card
    run = load_run(trained)
    net, config = run.net, run.config
    assert card["weights_sha256"] == weights_sha256(net)
    assert card["modalities"] == ["flair", "t1", "t1ce", "t2"]
    assert card["preprocessing"] == config.preprocessing.to_dict()
    assert card["parity"]["real_patches"] == 1
    assert 0 <= card["parity"]["max_abs_diff_probabilities"] <= PARITY_TOLERANCE
    assert not any(n.name.startswith("head") for n in model.graph.initializer)  # no auxiliary heads


def test_the_exported_card_has_the_onnx_fields_and_the_shipped_cards_keys(exported):
    _, card = exported
    assert card["opset"] == 18 and card["graph_sha256"] and card["parity"]
    optional = ("evaluation", "postprocessing")  # the shipped card has both, the tiny export neither
    assert list(card) == [k for k in json.loads(SHIPPED_CARD.read_text()) if k not in optional]


def test_the_card_names_its_data_without_a_path_of_the_machine(exported, trained):
    """A card travels with the model: data by data set and case ids, never an absolute path."""
    _, card = exported
    split = json.loads((trained / "split.json").read_text())["folds"][0]
    assert card["training"]["data"] == {"dataset": "train", "train": sorted(split["train"]),
                                        "val": sorted(split["val"])}
    assert card["training"]["init"] is None
    assert [s for s in strings(card) if s.startswith("/") or str(trained.parent) in s] == []


def test_a_run_folders_card_is_the_exported_one_without_the_onnx_fields(exported, trained):
    _, card = exported
    segmenter = Segmenter.load(trained)
    assert not set(ONNX_FIELDS) & set(segmenter.card)
    assert "opset" not in segmenter.card
    without = {k: v for k, v in card.items() if k not in ONNX_FIELDS}
    assert {**segmenter.card, "git": None} == {**without, "git": None}
    assert segmenter.model_info["graph_sha256"] is None


def test_load_run_builds_the_checkpoints_network_in_eval_mode(trained):
    last = load_run(trained, "last")
    assert last.checkpoint == trained / "checkpoints" / "last.pt" and not last.net.training
    run = load_run(trained)
    assert run.checkpoint == trained / "checkpoints" / "best.pt" and not run.net.training
    assert run.epoch == 2 and run.config.optim.epochs == 2
    assert run.weights_sha256 == weights_sha256(run.net)
    assert len(run.fold["train"]) + len(run.fold["val"]) == 6
    with pytest.raises(ConfigurationError, match="best or last"):
        load_run(trained, "first")


def test_onnx_runtime_matches_torch_on_other_shapes_and_masks(exported, trained):
    out, _ = exported
    net = load_run(trained).net
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(5)
    for shape, mask in [((1, 4, 24, 16, 32), [[1, 1, 1, 1]]), ((3, 4, 16, 16, 16), [[1, 1, 0, 1], [0, 1, 1, 1], [1, 0, 0, 0]])]:
        image = torch.randn(*shape, generator=generator)
        mask = torch.tensor(mask, dtype=torch.float32)
        with torch.no_grad():
            expected = torch.sigmoid(net(image, mask)).numpy()
        logits = session.run(None, {"image": image.numpy(), "modality_mask": mask.numpy()})[0]
        assert logits.shape == expected.shape
        assert np.abs(1 / (1 + np.exp(-logits)) - expected).max() <= PARITY_TOLERANCE


def test_a_file_name_without_onnx_suffix_is_refused(trained, tmp_path):
    with pytest.raises(ConfigurationError, match=r"\.onnx"):
        export_run(trained, tmp_path / "model.bin")
    assert not list(tmp_path.iterdir())


def test_export_command_errors_are_one_line_and_write_nothing(trained, tmp_path):
    """(The command's successful export: test_several_runs_export_as_one_ensemble_model.)"""
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"WT": {"min_ml": 1, "radius_mm": 20}}))
    code, text = cli("export", "--run", trained, "--out", tmp_path / "y.onnx", "--postprocessing", rules)
    assert code == 2 and "rules.json: postprocessing.WT must be an object of" in text and "Traceback" not in text
    assert not (tmp_path / "y.onnx").exists()
    code, text = cli("export", "--run", tmp_path / "nothing", "--out", tmp_path / "x.onnx")
    assert code == 2 and "checkpoint is missing" in text
    assert not (tmp_path / "x.onnx").exists()


def test_an_ensemble_graph_gives_the_logit_of_its_members_mean_probability():
    from brats_cggm.export import InferenceGraph
    from brats_cggm.network import build_network

    torch.manual_seed(0)
    nets = [build_network("small", channels=(2, 4), strides=(2, 2), head_channels=2).eval() for _ in range(3)]
    image, mask = torch.randn(2, 4, 16, 16, 16), torch.tensor([[1.0, 1, 1, 1], [1, 0, 1, 0]])
    with torch.no_grad():
        mean = torch.stack([torch.sigmoid(net(image, mask)) for net in nets]).mean(dim=0)
        ensemble = torch.sigmoid(InferenceGraph(*nets)(image, mask))
        single = InferenceGraph(nets[0])(image, mask)
    assert torch.allclose(ensemble, mean, atol=1e-6)
    assert torch.equal(single, nets[0](image, mask))


def test_several_runs_export_as_one_ensemble_model(trained, exported, tmp_path):
    """The export command (one export: each costs ~10 s): two runs, test-time augmentation
    and the clean-up rules of a file, all in the card."""
    out, rules = tmp_path / "ensemble.onnx", tmp_path / "rules.json"
    rules.write_text(json.dumps({"WT": {"min_ml": 1, "max_distance_mm": 20}, "small_et_ml": 0.5}))
    code, text = cli("export", "--run", trained, "--run", trained, "--out", out, "--parity-cases", "0", "--tta",
                     "--postprocessing", rules)
    assert code == 0, text
    assert card_path(out).exists() and "max |p_onnx - p_torch|" in text
    assert Segmenter.load(out).card["postprocessing"] == {"connectivity": 26, "WT": {"min_ml": 1.0, "max_distance_mm": 20.0},
                                                          "small_et_ml": 0.5}
    card, single = Segmenter.load(out).card, exported[1]
    assert card["inference"]["tta"] is True and single["inference"]["tta"] is False and Segmenter.load(out).tta
    members = card["training"]["ensemble"]["members"]
    assert [m["weights_sha256"] for m in members] == [single["weights_sha256"]] * 2
    assert members[0]["data"] == single["training"]["data"] and "data" not in card["training"]
    assert card["weights_sha256"] != single["weights_sha256"]
    # two copies of one network: the ensemble's probabilities are the network's
    image, mask = np.random.default_rng(0).normal(size=(1, 4, 16, 16, 16)).astype(np.float32), np.ones((1, 4), np.float32)
    logits = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"image": image, "modality_mask": mask})[0] for path in (out, exported[0])]
    assert np.abs(1 / (1 + np.exp(-logits[0])) - 1 / (1 + np.exp(-logits[1]))).max() <= PARITY_TOLERANCE
