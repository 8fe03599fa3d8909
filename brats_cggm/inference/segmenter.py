"""The segmenter: one object that turns a case into a label map, for the CLI, the web app
and pipelines.

>>> segmenter = Segmenter.load("brats_cggm_real")   # a shipped model's name, an .onnx file or a run folder
>>> result = segmenter.predict_case(case, tta=True, contributions="occlusion")
>>> result.labels.shape == result.shape, result.volumes_ml()["WT"]

Steps: read the sequences (a missing one becomes a zero channel switched off through
``modality_mask``, when the model was trained with modality dropout) -> the model card's
preprocessing (orientation, spacing, foreground crop, z-score) -> sliding-window inference
with Gaussian blending of the windows' probabilities (optionally averaged over the 8
mirrorings of each window, and with the coalitions that contribution maps need) -> every
map resampled back to the input's own grid -> regions at the card's threshold -> a label
map -> the card's clean-up (:mod:`~brats_cggm.inference.postprocessing`, the same for both
chains) -> BraTS 2021 (or 2023) numbering.

Two chains do the pre- and post-processing, on the same grids and with the same windows
and weights (``tests/test_numpy_chain.py`` holds them together):

* ``numpy`` (:mod:`~brats_cggm.inference.grid`, :mod:`~brats_cggm.inference.windows`):
  numpy, SciPy and nibabel only. The default for an ONNX file, with or without torch
  installed: it is the one the torch-free install has, and it is faster (it resamples
  and inverts only the brain's box).
* ``monai`` (:mod:`~brats_cggm.inference.monai_chain`): the MONAI transforms training and
  evaluation use. The default for a run folder (torch network); ``chain="monai"`` picks
  it for an ONNX file too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from itertools import combinations
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from brats_cggm import MODALITIES, models
from brats_cggm.data.labels import labels_from_regions, to_scheme
from brats_cggm.data.layouts import Case
from brats_cggm.data.preprocessing import PreprocessConfig
from brats_cggm.data.validation import load_sequences
from brats_cggm.errors import ConfigurationError, IncompatibleModel, InconsistentCase
from brats_cggm.inference.backends import Backend, OnnxBackend, model_kind
from brats_cggm.inference.card import mirror_tta, model_card, read_onnx, sequence_dropout, windowing
from brats_cggm.inference.contributions import CoalitionPlan, coalition_plan
from brats_cggm.inference.grid import EmptyImage
from brats_cggm.inference.numpy_chain import numpy_maps
from brats_cggm.inference.postprocessing import choose_postprocessing
from brats_cggm.inference.prediction import Prediction

CHAINS = ("numpy", "monai")

OUTPUT_SCHEMES = ("brats2021", "brats2023")
#: every mirroring of a 3-D window (nnU-Net's test-time augmentation), identity first
MIRRORS = tuple(axes for n in range(4) for axes in combinations((2, 3, 4), n))


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """The logistic function in the logits' dtype, without overflow (0.5 + 0.5 tanh(x / 2))."""
    half = np.asarray(logits) * np.asarray(0.5, dtype=np.asarray(logits).dtype)
    return np.tanh(half, out=half) * half.dtype.type(0.5) + half.dtype.type(0.5)


class Segmenter:
    """A model and its card; ``predict_*`` run the whole chain for one case."""

    def __init__(self, backend: Backend, card: dict[str, Any], source: str | Path,
                 sw_batch_size: int = 2, train_config: Any = None, chain: str = "numpy",
                 postprocessing: str | Path = "card", tta: bool | None = None) -> None:
        if chain not in CHAINS:
            raise ConfigurationError(f"chain must be one of {', '.join(CHAINS)}; got '{chain}'")
        self.backend, self.card, self.source, self.chain = backend, card, str(source), chain
        #: the run's TrainConfig when loaded from a run folder (None for an ONNX file)
        self.train_config = train_config
        self.preprocessing = PreprocessConfig.from_dict(card["preprocessing"])
        self.windowing = windowing(card, sw_batch_size)
        self.threshold = float(card["outputs"].get("threshold", 0.5))
        #: the clean-up applied to every label map (None: none), see :func:`choose_postprocessing`
        self.postprocessing = choose_postprocessing(card, postprocessing)
        #: whether a prediction averages the 8 mirrorings when not told (``tta``, else the card's
        #: ``inference.tta``)
        self.tta = mirror_tta(card) if tta is None else bool(tta)

    @classmethod
    def load(cls, model: str | Path | None = None, provider: str = "cpu", device: str = "cpu",
             checkpoint: str = "best", threads: int | None = None, chain: str | None = None,
             postprocessing: str | Path = "card", tta: bool | None = None) -> Segmenter:
        """An exported ``.onnx`` (ONNX Runtime on ``provider``), a shipped model's name or a run
        folder (torch on ``device``, from ``checkpoints/<checkpoint>.pt``); default: the shipped
        default model (:mod:`brats_cggm.models`).
        ``chain``: ``numpy`` (an ONNX file's default) or ``monai`` (a run folder's default;
        needs torch and MONAI). ``postprocessing``: ``card`` (the card's rules, if any),
        ``off`` or a JSON file of rules (:mod:`~brats_cggm.inference.postprocessing`). ``tta``:
        average the 8 mirrorings (None: as the card says)."""
        path = models.resolve(model)
        if model_kind(path) == "onnx":
            onnx_model, card = read_onnx(path)
            return cls(OnnxBackend(onnx_model.SerializeToString(), provider, threads), card, path,
                       chain=chain or "numpy", postprocessing=postprocessing, tta=tta)
        from brats_cggm.inference.backends import TorchBackend, check_device
        from brats_cggm.training.trained import load_run

        run = load_run(path, checkpoint)
        return cls(TorchBackend(run.net, check_device(device)), model_card(run), run.checkpoint,
                   train_config=run.config, chain=chain or "monai", postprocessing=postprocessing, tta=tta)

    @property
    def model_info(self) -> dict[str, Any]:
        """Which model made a prediction, for the outputs' JSON."""
        card = self.card
        return {"source": self.source, "description": card.get("description", ""),
                "graph_sha256": card.get("graph_sha256"), "weights_sha256": card.get("weights_sha256")}

    def applied(self) -> str:
        """What every prediction applies besides the network, in one line (``predict`` prints it)."""
        members = len((self.card.get("training") or {}).get("ensemble", {}).get("members", ())) or 1
        network = f"ensemble of {members} networks" if members > 1 else "one network"
        tta = "8 mirrorings averaged (TTA)" if self.tta else "no mirroring (TTA off)"
        cleanup = f"clean-up: {self.postprocessing.describe()}" if self.postprocessing else "no clean-up"
        return f"{Path(self.source).name}: {network}, {tta}, {cleanup}"

    @property
    def allows_missing(self) -> bool:
        """Whether a sequence may be missing (the model was trained with sequence dropout)."""
        return sequence_dropout(self.card) > 0

    def predict_case(self, case: Case, **options: Any) -> Prediction:
        """Predict a case found on disk (every layout; ``None`` images are missing sequences)."""
        volumes = load_sequences(case)
        reference = next(iter(volumes.values()))
        inputs = {m: (str(volumes[m].path) if m in volumes else None) for m in MODALITIES}
        return self._predict(case.case_id, {m: v.data for m, v in volumes.items()}, reference.affine,
                             reference.header, inputs=inputs, **options)

    def predict_arrays(self, arrays: Mapping[str, np.ndarray], affine: np.ndarray, case_id: str = "case",
                       header: nib.Nifti1Header | None = None, **options: Any) -> Prediction:
        """Predict from 3-D arrays by sequence name (any subset of ``flair, t1, t1ce, t2``)
        on one grid with the voxel-to-world ``affine`` (4 x 4, RAS+ mm, as nibabel's)."""
        unknown = sorted(set(arrays) - set(MODALITIES))
        if unknown:
            raise InconsistentCase(case_id, f"unknown sequence(s) {', '.join(unknown)} (expected {', '.join(MODALITIES)})")
        shapes = {np.shape(a) for a in arrays.values()}
        if len(shapes) != 1 or len(next(iter(shapes), ())) != 3:
            raise InconsistentCase(case_id, f"the sequences must be 3-D arrays of one shape; got {sorted(shapes)}")
        affine = np.asarray(affine, dtype=float)
        if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
            raise InconsistentCase(case_id, "the affine must be a finite, invertible 4 x 4 matrix")
        for name, array in arrays.items():
            if not np.isfinite(array).all():
                raise InconsistentCase(case_id, f"NaN/Inf voxels in {name}")
        return self._predict(case_id, dict(arrays), affine, header, **options)

    def _predict(self, case_id: str, arrays: dict[str, np.ndarray], affine: np.ndarray,
                 header: nib.Nifti1Header | None, tta: bool | None = None, contributions: str | None = None,
                 label_scheme: str = "brats2021", inputs: dict[str, str | None] | None = None,
                 progress: Callable[[int, int], None] | None = None, any_subset: bool = False) -> Prediction:
        """``progress(done, total)`` is called after each batch of sliding windows; ``any_subset``
        lets a model trained without modality dropout run with sequences missing (to score
        how it degrades, as ``brats-cggm evaluate --subsets`` does); ``tta`` None: the card's."""
        if label_scheme not in OUTPUT_SCHEMES:
            raise ConfigurationError(f"label scheme must be one of {', '.join(OUTPUT_SCHEMES)}; got '{label_scheme}'")
        start = time.perf_counter()
        tta = self.tta if tta is None else tta
        present = [m in arrays for m in MODALITIES]
        missing = [m for m in MODALITIES if m not in arrays]
        if missing and not (self.allows_missing or any_subset):
            raise IncompatibleModel(
                f"{case_id}: {', '.join(missing)} missing, and {self.source} was trained without modality "
                "dropout: it needs all four sequences"
            )
        plan = coalition_plan(present, contributions)
        chain_maps = numpy_maps
        if self.chain == "monai":
            from brats_cggm.inference.monai_chain import monai_maps as chain_maps
        try:
            maps = chain_maps(arrays, affine, self.preprocessing, self.windowing, self._window_predictor(plan, tta), progress)
        except EmptyImage as error:
            raise InconsistentCase(case_id, f"{error}: nothing to segment") from None
        probabilities = np.clip(maps[:3], 0.0, 1.0)
        labels, applied = labels_from_regions(probabilities > self.threshold), None
        if self.postprocessing is not None:
            labels, applied = self.postprocessing(labels, affine)
        return Prediction(
            case_id, to_scheme(labels, label_scheme), label_scheme, probabilities, affine, header,
            tuple(m for m in MODALITIES if m in arrays), tta,
            {seq: maps[3 + 3 * i: 6 + 3 * i] for i, seq in enumerate(plan.sequences)}, contributions,
            time.perf_counter() - start, inputs or {m: ("array" if m in arrays else None) for m in MODALITIES},
            applied,
        )

    def _window_predictor(self, plan: CoalitionPlan, tta: bool) -> Callable[[np.ndarray], np.ndarray]:
        """``window [B, 4, *patch] -> [B, 3 + 3k, *patch]`` (float32 numpy): the
        probabilities with every present sequence on, then each sequence's contribution
        (linear in the coalitions' probabilities), averaged over the mirrorings when ``tta``."""
        masks = np.asarray(plan.masks, dtype=np.float32)
        weights = plan.weights

        def predict(window: np.ndarray) -> np.ndarray:
            total = None
            mirrors = MIRRORS if tta else ((),)
            for axes in mirrors:
                x = np.ascontiguousarray(np.flip(window, axes)) if axes else window
                full, parts = None, [None] * len(plan.sequences)
                for s, mask in enumerate(masks):
                    p = sigmoid(self.backend(x, np.broadcast_to(mask, (x.shape[0], mask.size))))
                    if s == plan.full:
                        full = p
                    for i in range(len(parts)):
                        if weights[i, s]:
                            term = np.float32(weights[i, s]) * p
                            parts[i] = term if parts[i] is None else parts[i] + term
                out = np.concatenate([full, *parts], axis=1)
                out = np.flip(out, tuple(a for a in axes)) if axes else out
                total = out if total is None else total + out
            return (total / np.float32(len(mirrors))).astype(np.float32, copy=False)

        return predict


__all__ = ["CHAINS", "OUTPUT_SCHEMES", "Segmenter"]
