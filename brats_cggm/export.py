"""Export a trained run to ONNX: the fused inference network only, with its model card.

The graph takes ``image [N, 4, D, H, W]`` (float32, preprocessed as the card says) and
``modality_mask [N, 4]`` (1 = sequence present, 0 = switched off) and returns region
``logits [N, 3, D, H, W]`` (TC, WT, ET; apply a sigmoid). Batch and spatial axes are
dynamic (spatial sizes must be multiples of the card's ``divisor``). The auxiliary heads
are not part of it. The card (:func:`brats_cggm.inference.card.model_card`, plus the
ONNX-only fields: opset, graph digest, parity) is written beside the file
(``NAME.card.json``) and into the ONNX metadata (``model_card``); export checks the graph
with ``onnx.checker`` and its parity with torch on random and, when given, real patches,
and records both in the card.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from brats_cggm import MODALITIES
from brats_cggm.errors import BadInputFile, ConfigurationError
from brats_cggm.inference.card import METADATA_KEY, card_path, check_card, graph_sha256, model_card
from brats_cggm.inference.postprocessing import choose_postprocessing
from brats_cggm.training.checkpoint import state_sha256
from brats_cggm.training.trained import TrainedRun, load_run
from multimodal_general.io import atomic_write, atomic_write_text, read_json_object

OPSET = 18
#: the largest difference of probabilities torch and ONNX Runtime may show
PARITY_TOLERANCE = 1e-4


class InferenceGraph(nn.Module):
    """What is exported: the network's forward with an explicit modality mask; with several
    networks (a fold ensemble), the logits of their mean probability."""

    #: probabilities are kept this far from 0 and 1 before the logit (float32)
    EPS = 1e-7

    def __init__(self, *nets: nn.Module) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, image: Tensor, modality_mask: Tensor) -> Tensor:
        if len(self.nets) == 1:
            return self.nets[0](image, modality_mask)
        mean = torch.stack([torch.sigmoid(net(image, modality_mask)) for net in self.nets]).mean(dim=0)
        return torch.logit(mean, eps=self.EPS)


def weights_sha256(net: nn.Module) -> str:
    """A digest of the network's weights (names, shapes, values), for the card."""
    return state_sha256(net)


def export_run(
    run_dir: Path | Sequence[Path], out: Path, checkpoint: str = "best", parity_cases: int = 1, description: str = "",
    evaluation: Path | None = None, postprocessing: Path | None = None, tta: bool = False,
) -> dict[str, Any]:
    """Export ``RUN/checkpoints/<checkpoint>.pt`` to ``out`` (and ``out``'s card); returns the card.

    Several run folders make one fold ensemble: one graph that averages their probabilities
    (the runs must share preprocessing, window and network), whose card lists each member.
    Parity is also checked on ``parity_cases`` of the (first) run's validation cases (when its
    data folder is still there). ``evaluation``: a JSON file of results on unseen cases for
    the card; ``postprocessing``: a JSON file of the clean-up rules every inference applies
    (:mod:`brats_cggm.inference.postprocessing`); ``tta``: predictions average the 8 mirrorings
    unless told otherwise (the card's ``inference.tta``).
    """
    if out.suffix != ".onnx":
        raise ConfigurationError(f"{out}: the exported file must end in .onnx")
    results = read_json_object(evaluation, "evaluation", BadInputFile) if evaluation is not None else None
    rules = choose_postprocessing({}, postprocessing) if postprocessing is not None else None
    runs = [load_run(d, checkpoint) for d in ([run_dir] if isinstance(run_dir, (str, Path)) else run_dir)]
    card = ensemble_card(runs, description, results, rules.to_dict() if rules is not None else None)
    card["inference"]["tta"] = bool(tta)
    card = check_card({**card, "opset": OPSET}, runs[0].checkpoint)
    graph = InferenceGraph(*(run.net for run in runs)).eval()
    patch = runs[0].config.preprocessing.patch_size
    model = _to_onnx(graph, patch, runs[0].divisor)
    onnx.checker.check_model(model, full_check=True)
    card["graph_sha256"] = graph_sha256(model)
    card["parity"] = _parity(graph, model, patch, validation_patches(runs[0], parity_cases))
    onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(card)})
    data = model.SerializeToString()
    atomic_write(out, lambda handle: handle.write(data))
    atomic_write_text(card_path(out), json.dumps(card, indent=1) + "\n")
    return card


#: what the members of an ensemble must share (the card's keys): one preprocessing, window and network
SHARED = ("preprocessing", "inference", "network", "modalities", "outputs", "label_scheme")


def ensemble_card(runs: Sequence[TrainedRun], description: str, results: dict | None,
                  rules: dict | None) -> dict[str, Any]:
    """The card of one run, or of a fold ensemble: the first run's card, with ``ensemble`` listing
    every member's training record and weights' digest (``weights_sha256`` then covers all)."""
    cards = [model_card(run, description, results, rules) for run in runs]
    card = cards[0]
    if len(runs) == 1:
        return card
    for run, other in zip(runs[1:], cards[1:]):
        differing = [key for key in SHARED if other[key] != card[key]]
        if differing:
            raise ConfigurationError(f"{run.run_dir}: its {', '.join(differing)} differ from those of "
                                     f"{runs[0].run_dir}; an ensemble's members must share them")
    own = ("epochs", "train_cases", "val_cases", "data", "init")  # what each member's training has its own
    members = [{"weights_sha256": c["weights_sha256"], "validation_metrics": c["validation_metrics"],
                **{key: c["training"][key] for key in own}} for c in cards]
    digest = hashlib.sha256("".join(m["weights_sha256"] for m in members).encode()).hexdigest()
    training = {key: value for key, value in card["training"].items() if key not in own}
    return {**card, "training": {**training, "ensemble": {"members": members,
                                                          "combination": "mean of the members' probabilities"}},
            "validation_metrics": {}, "weights_sha256": digest}


def _to_onnx(graph: nn.Module, patch: Sequence[int], divisor: int, dynamic: bool = True) -> onnx.ModelProto:
    """``graph`` as ONNX, for any batch size and any multiple of ``divisor`` in each spatial axis
    (``dynamic`` false: for ``patch`` and batch 1 only, about five times faster to export)."""
    dim = torch.export.Dim
    example = (torch.zeros(1, len(MODALITIES), *patch), torch.ones(1, len(MODALITIES)))
    spatial = {axis + 2: divisor * dim(name, min=1) for axis, name in enumerate(("d", "h", "w"))}
    batch = dim("batch")
    shapes = {"image": {0: batch, **spatial}, "modality_mask": {0: batch}} if dynamic else None
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), _quiet_exporter():
        target = Path(tmp) / "model.onnx"
        torch.onnx.export(
            graph, example, target, input_names=["image", "modality_mask"], output_names=["logits"],
            dynamic_shapes=shapes,
            opset_version=OPSET, dynamo=True, external_data=False, verbose=False,
        )
        return onnx.load(io.BytesIO(target.read_bytes()))


@contextmanager
def _quiet_exporter():
    """The exporter's notes (optional torchvision ops it skips, deprecations inside torch)
    say nothing about the user's model; a failed export still raises."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _parity(graph: nn.Module, model: onnx.ModelProto, patch: Sequence[int],
            patches: Sequence[np.ndarray]) -> dict[str, Any]:
    """Maximum absolute difference of the probabilities of torch and ONNX Runtime, on a
    random batch with one sequence switched off and on each real patch."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(2, len(MODALITIES), *patch, generator=generator), torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1]]))]
    inputs += [(torch.as_tensor(p, dtype=torch.float32)[None], torch.ones(1, len(MODALITIES))) for p in patches]
    differences = []
    for image, mask in inputs:
        with torch.no_grad():
            expected = torch.sigmoid(graph(image, mask.float())).numpy()
        logits = session.run(None, {"image": image.numpy(), "modality_mask": mask.float().numpy()})[0]
        differences.append(float(np.abs(1 / (1 + np.exp(-logits)) - expected).max()))
    worst = max(differences)
    if not worst <= PARITY_TOLERANCE:
        raise ConfigurationError(
            f"ONNX Runtime and torch disagree by {worst:.2e} on probabilities (tolerance {PARITY_TOLERANCE:g}); not exported"
        )
    return {"max_abs_diff_probabilities": worst, "random_batches": 1, "real_patches": len(patches),
            "tolerance": PARITY_TOLERANCE, "provider": "CPUExecutionProvider"}


def validation_patches(run: TrainedRun, count: int = 1) -> list[np.ndarray]:
    """Preprocessed images of up to ``count`` of the run's validation cases, padded or
    cropped about their centre to the patch size (real data for the parity check)."""
    from monai.transforms import ResizeWithPadOrCrop

    from brats_cggm.data.layouts import discover
    from brats_cggm.data.transforms import case_to_dict, inference_transforms

    config = run.config
    wanted = set(run.fold["val"])
    if count < 1 or not wanted or config.data.dir is None or not Path(config.data.dir).is_dir():
        return []
    cases = [c for c in discover(config.data.dir, config.data.layout).cases if c.case_id in wanted][:count]
    chain, fit = inference_transforms(config.preprocessing), ResizeWithPadOrCrop(config.preprocessing.patch_size)
    return [np.asarray(fit(chain(case_to_dict(case))["image"])) for case in cases]
