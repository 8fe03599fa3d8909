"""Model cards: what a model needs to be fed as in training, checked before it is used.

:func:`model_card` builds the card every trained model has (sequences, label scheme,
preprocessing, window and blending, the training record, the weights' digest, intended
use); an exported model's card adds the ONNX-only fields (:data:`ONNX_FIELDS`: opset,
graph digest, parity with torch), which :mod:`brats_cggm.export` fills in. A card is a
JSON object written beside each exported model (``NAME.card.json``) and into its ONNX
metadata (``model_card``). :func:`check_card` refuses a card that this program
cannot honour (another format, other sequences, an unknown label scheme, preprocessing it
does not implement); :func:`read_onnx` also refuses a model whose weights no longer match
the digest its card recorded, or whose card beside the file disagrees with the embedded one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
from onnx import numpy_helper

from brats_cggm import MODALITIES
from brats_cggm.data.labels import REGIONS, SCHEMES
from brats_cggm.errors import ConfigurationError, IncompatibleModel
from brats_cggm.inference.postprocessing import choose_postprocessing
from brats_cggm.inference.windows import Windowing
from multimodal_general.runs.provenance import git_revision, versions

if TYPE_CHECKING:
    from brats_cggm.training.trained import TrainedRun

CARD_FORMAT = "brats-cggm-model-card/1"
METADATA_KEY = "model_card"
INTENDED_USE = "research and demonstration; not a medical device, not for clinical use"
#: what only an exported (ONNX) model's card holds, added in this order after the rest
ONNX_FIELDS = ("opset", "graph_sha256", "parity")
#: how the sliding window blends overlapping windows (``inference.blending``; a card
#: without it was exported when Gaussian blending with sigma 0.125 x the window was the
#: only one)
BLEND_MODES = ("gaussian", "constant")
DEFAULT_BLENDING = ("gaussian", 0.125)


def model_card(run: TrainedRun, description: str = "", evaluation: dict[str, Any] | None = None,
               postprocessing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything inference needs to feed ``run``'s network as in training, and where it
    came from; ``evaluation``: how the model (or its recipe, cross-validated) scored on
    cases it never saw, stored as given; ``postprocessing``: the clean-up rules inference
    applies (:mod:`~brats_cggm.inference.postprocessing`; none without). No ONNX-only field
    (see :data:`ONNX_FIELDS`)."""
    config, pre = run.config, run.config.preprocessing
    return {
        "format": CARD_FORMAT,
        "description": description,
        "intended_use": INTENDED_USE,
        "modalities": list(MODALITIES),
        "outputs": {"logits": list(REGIONS), "activation": "sigmoid", "threshold": 0.5},
        "label_scheme": "brats2021",
        "preprocessing": pre.to_dict(),
        "inference": {"patch_size": list(pre.patch_size), "overlap": config.validation.overlap,
                      "divisor": run.divisor, "blending": DEFAULT_BLENDING[0], "sigma_scale": DEFAULT_BLENDING[1],
                      "tta": False},
        "network": {"preset": config.network.preset, "sequence_dropout": config.network.sequence_dropout,
                    "overrides": config.network.overrides,
                    **({"fusion": run.fusion} if run.fusion is not None else {})},
        "training": {"balancer": config.balancer.name,
                     "cggm_preset": config.balancer.preset if config.balancer.name == "cggm" else None,
                     "epochs": run.epoch, "train_cases": len(run.fold["train"]),
                     "val_cases": len(run.fold["val"]), **training_data(run)},
        **({"postprocessing": postprocessing} if postprocessing else {}),
        "validation_metrics": run.metrics,
        **({"evaluation": evaluation} if evaluation else {}),
        "weights_sha256": run.weights_sha256,
        "versions": versions("torch", "monai", "onnx", "onnxruntime", "brats-cggm"),
        "git": git_revision(),
    }


def training_data(run: TrainedRun) -> dict[str, Any]:
    """What the network learned from, named without any path of the machine that trained it
    (a card travels): the data folder's name and the case ids of each split, and the run it
    started from (``--init``) by its folder's name."""
    init = run.config.init
    return {"data": {"dataset": Path(run.config.data.dir).name,
                     "train": sorted(run.fold["train"]), "val": sorted(run.fold["val"])},
            "init": Path(init).name if init else None}


def card_path(model_path: Path) -> Path:
    """Where the card of ``model_path`` lies: ``NAME.card.json`` beside ``NAME.onnx``."""
    return Path(model_path).with_suffix(".card.json")


def graph_sha256(model: onnx.ModelProto) -> str:
    """A digest of the weights inside an ONNX graph (every initializer's name, type, shape
    and values, in name order); the metadata, and so the card itself, is not part of it."""
    digest = hashlib.sha256()
    for tensor in sorted(model.graph.initializer, key=lambda t: t.name):
        values = numpy_helper.to_array(tensor)
        digest.update(f"{tensor.name}|{values.dtype}|{values.shape}|".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()


def check_card(card: Any, source: str | Path) -> dict[str, Any]:
    """``card`` if this program can feed the model as the card says; otherwise an
    :class:`IncompatibleModel` naming ``source`` and the first disagreement."""
    from brats_cggm.data.preprocessing import PreprocessConfig

    def refuse(problem: str) -> IncompatibleModel:
        return IncompatibleModel(f"{source}: {problem}")

    if not isinstance(card, dict):
        raise refuse("the model card is not a JSON object")
    if card.get("format") != CARD_FORMAT:
        raise refuse(f"model card format {card.get('format')!r} is not {CARD_FORMAT!r}")
    modalities = card.get("modalities")
    if modalities != list(MODALITIES):
        count = len(modalities) if isinstance(modalities, list) else "?"
        raise refuse(
            f"the model takes {count} sequence(s) ({', '.join(map(str, modalities or []))}); "
            f"this program feeds {len(MODALITIES)} ({', '.join(MODALITIES)}) in that order"
        )
    if card.get("label_scheme") not in SCHEMES:
        raise refuse(f"unknown label scheme {card.get('label_scheme')!r} (known: {', '.join(SCHEMES)})")
    outputs = card.get("outputs") or {}
    if outputs.get("logits") != list(REGIONS) or outputs.get("activation") != "sigmoid":
        raise refuse(f"the model's outputs {outputs.get('logits')} are not sigmoid logits of {', '.join(REGIONS)}")
    try:
        PreprocessConfig.from_dict(card.get("preprocessing") or {})
        inference = card["inference"]
        if len(inference["patch_size"]) != 3 or not 0 <= float(inference["overlap"]) < 1 or int(inference["divisor"]) < 1:
            raise ValueError("patch_size, overlap or divisor out of range")
        mode, sigma = blending(card)
        if mode not in BLEND_MODES or not sigma > 0:
            raise ValueError(f"blending {mode!r} with sigma_scale {sigma} (known: {', '.join(BLEND_MODES)}, sigma_scale > 0)")
        if not isinstance(inference.get("tta", False), bool):
            raise ValueError(f"tta {inference.get('tta')!r} is not true or false")
        if not 0 < float(outputs.get("threshold", 0.5)) < 1:
            raise ValueError(f"threshold {outputs.get('threshold')} outside (0, 1)")
    except (ConfigurationError, KeyError, TypeError, ValueError) as error:
        raise refuse(f"the card's preprocessing/inference settings are unusable ({error})") from None
    try:
        choose_postprocessing(card)
    except ConfigurationError as error:
        raise refuse(f"the card's {error}") from None
    return card


def blending(card: dict[str, Any]) -> tuple[str, float]:
    """The card's blending of overlapping windows: mode and the Gaussian's sigma as a
    fraction of the window size."""
    inference = card.get("inference") or {}
    return str(inference.get("blending", DEFAULT_BLENDING[0])), float(inference.get("sigma_scale", DEFAULT_BLENDING[1]))


def sequence_dropout(card: dict[str, Any]) -> float:
    """The probability with which training switched each sequence off (``network.sequence_dropout``;
    a card written before that setting was renamed calls it ``modality_dropout``)."""
    network = card.get("network") or {}
    return float(network.get("sequence_dropout", network.get("modality_dropout", 0.0)))


def mirror_tta(card: dict[str, Any]) -> bool:
    """Whether predictions average the 8 mirrorings of each window unless told otherwise
    (``inference.tta``; off in a card without it)."""
    return bool((card.get("inference") or {}).get("tta", False))


def windowing(card: dict[str, Any], sw_batch_size: int = 2) -> Windowing:
    """The card's sliding window, ``sw_batch_size`` windows per call of the network."""
    mode, sigma_scale = blending(card)
    return Windowing(tuple(int(v) for v in card["inference"]["patch_size"]), float(card["inference"]["overlap"]),
                     sw_batch_size, mode, sigma_scale)


def read_onnx(path: Path) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The model at ``path`` and its checked card (see the module's docstring)."""
    path = Path(path)
    if not path.is_file():
        raise IncompatibleModel(f"{path}: model file not found")
    try:
        model = onnx.load(path)
    except Exception as error:  # protobuf raises several types for a file that is not ONNX
        raise IncompatibleModel(f"{path}: not an ONNX model ({error.__class__.__name__})") from None
    metadata = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in metadata:
        raise IncompatibleModel(f"{path}: no model card in the ONNX metadata; export models with `brats-cggm export`")
    try:
        card = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError:
        raise IncompatibleModel(f"{path}: the model card in the ONNX metadata is not valid JSON") from None
    beside = card_path(path)
    if beside.exists():
        try:
            if json.loads(beside.read_text()) != card:
                raise IncompatibleModel(f"{beside}: disagrees with the model card inside {path.name}")
        except json.JSONDecodeError:
            raise IncompatibleModel(f"{beside}: not valid JSON") from None
    check_card(card, path)
    recorded = card.get("graph_sha256")
    if recorded != graph_sha256(model):
        raise IncompatibleModel(
            f"{path}: the weights do not match the digest in the model card (file altered or card from another model)"
        )
    channels = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    if channels and channels != len(MODALITIES):
        raise IncompatibleModel(f"{path}: the graph takes {channels} input channels, the card {len(MODALITIES)} sequences")
    return model, card
