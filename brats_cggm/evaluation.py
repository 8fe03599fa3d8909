"""Evaluate a trained run or an exported model on whole cases, on each case's original grid.

Each case goes through the segmenter (the model's preprocessing, sliding-window inference,
back to the grid of its files), the same code as ``brats-cggm predict``; the regions are
then compared with the case's own label file at its own voxel size, as the BraTS
challenge scores them: Dice and HD95 of each region (``dice/TC``, ``hd95/TC``, ...), then
their BraTS 2023 lesion-wise forms (``lesion_dice/TC``, ``lesion_hd95/TC``, ...). Writes
``cases.csv`` (one row per case) and ``summary.json`` (mean, std, median per metric) to
``RUN/evaluation/<split>`` for a run, to a folder of your choice for a model file.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import statistics
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

from brats_cggm import MODALITIES
from brats_cggm.data.labels import to_brats2021
from brats_cggm.data.layouts import Case, discover
from brats_cggm.data.splits import load_split
from brats_cggm.data.validation import load_sequences, validate_case
from brats_cggm.errors import BadInputFile, ConfigurationError, InconsistentCase
from brats_cggm.inference.backends import check_device
from brats_cggm.inference.segmenter import Segmenter
from brats_cggm.lesion_metrics import lesion_metrics
from brats_cggm.metrics import REGIONS, region_metrics, summarize
from brats_cggm.training.config import TrainConfig
from multimodal_general.io import atomic_write_text

SPLITS = ("val", "test", "train", "all")


def choose_cases(run_dir: Path, config: TrainConfig, data_dir: Path | None, split: str) -> list[Case]:
    """``val``: the run's validation cases; ``test``: the fold's ``test`` cases when its split
    names them (a nested split's inner test cases: the folder may hold cases kept for later),
    else the cases of the folder the run's split does not name (never seen in training or model
    selection); ``train``: the cases it trained
    on (a fit check: a network that cannot segment those has a problem no other case will
    hide); ``all``: every case."""
    folder = data_dir or (Path(config.data.dir) if config.data.dir else None)
    if folder is None:
        raise ConfigurationError("no data folder: give --data DIR")
    cases = _discover(folder, config.data.layout if data_dir is None else None)
    fold = load_split(run_dir / "split.json")["folds"][config.data.fold]
    unnamed = {c.case_id for c in cases} - set(fold["train"]) - set(fold["val"])
    wanted = {"val": set(fold["val"]), "test": set(fold["test"]) if "test" in fold else unnamed,
              "train": set(fold["train"])}
    chosen = cases if split == "all" else [c for c in cases if c.case_id in wanted[split]]
    return _labelled(chosen, folder, f"no {split} cases of this run in the folder")


def _discover(folder: Path, layout: str | None = None) -> list[Case]:
    """The cases of ``folder``; one that lacks sequences is scored with those it has (a model
    trained without sequence dropout refuses it, naming the case)."""
    found = discover(folder, layout, partial=True)
    if found.problems:
        raise found.problems[0]
    return found.cases


def _labelled(cases: list[Case], folder: Path, none: str) -> list[Case]:
    """``cases``, each checked to have a label map (``none``: the error when there is no case)."""
    if not cases:
        raise BadInputFile(folder, none)
    missing = [c.case_id for c in cases if c.label is None]
    if missing:
        raise BadInputFile(folder, f"case {missing[0]} has no label map; evaluation needs one")
    return cases


#: every non-empty subset of the sequences, all four first, then by size and canonical order
SUBSETS: tuple[tuple[str, ...], ...] = tuple(
    subset for size in range(len(MODALITIES), 0, -1) for subset in itertools.combinations(MODALITIES, size)
)


def subset_name(subset: Sequence[str]) -> str:
    return "+".join(subset)


def reference_regions(case: Case) -> tuple[torch.Tensor, list[float]]:
    """The case's TC/WT/ET masks ``[3, ...]`` on its own grid, and its voxel size."""
    label_file = nib.load(case.label)
    label = to_brats2021(np.asanyarray(label_file.dataobj).astype(np.int16), case.label_scheme)
    spacing = [float(z) for z in label_file.header.get_zooms()[:3]]
    return torch.as_tensor(ConvertToMultiChannelBasedOnBratsClasses()(label)), spacing


def score_case(segmenter: Segmenter, case: Case, subsets: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One case on its original grid: Dice and HD95 per region, classic and lesion-wise
    (:mod:`brats_cggm.lesion_metrics`), with the sequences it has and, with ``subsets``, the
    Dice of each of the 15 non-empty subsets of its four sequences (the others left out as a
    missing sequence is: switched off through the modality mask; early fusion gets a zero
    channel). The files are read once and the full set predicted once."""
    validate_case(case)
    volumes = load_sequences(case)
    if subsets and len(volumes) < len(MODALITIES):
        raise InconsistentCase(case.case_id, "scoring the subsets of the sequences needs all four")
    reference, spacing = reference_regions(case)
    first = next(iter(volumes.values()))

    def regions(subset: Sequence[str], any_subset: bool) -> torch.Tensor:
        arrays = {m: volumes[m].data for m in subset}
        prediction = segmenter.predict_arrays(arrays, first.affine, case.case_id, first.header, any_subset=any_subset)
        return torch.as_tensor(prediction.regions)

    full = regions(tuple(volumes), any_subset=False)  # refuses a missing sequence the model cannot take
    row = {"case_id": case.case_id, **region_metrics(full, reference, spacing, hd95=True),
           **lesion_metrics(full, reference, spacing)}
    full_dice = {k: v for k, v in row.items() if k.startswith("dice/")}
    per_subset = [
        {"case_id": case.case_id, "subset": subset_name(subset),
         **(full_dice if subset == MODALITIES
            else region_metrics(regions(subset, any_subset=True), reference, spacing, hd95=False))}
        for subset in (SUBSETS if subsets else ())
    ]
    return row, per_subset


def subset_table(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per subset the mean Dice over cases; their average per region (RFNet/mmFormer's
    summary) and the worst subset by mean Dice of the regions."""
    per_subset = {}
    for subset in dict.fromkeys(r["subset"] for r in rows):
        mine = [r for r in rows if r["subset"] == subset]
        per_subset[subset] = {f"dice/{g}": statistics.fmean(r[f"dice/{g}"] for r in mine) for g in REGIONS}
    average = {f"dice/{g}": statistics.fmean(v[f"dice/{g}"] for v in per_subset.values()) for g in REGIONS}
    worst = min(per_subset, key=lambda s: statistics.fmean(per_subset[s].values()))
    return {"subsets": per_subset, "average": average, "worst": {"subset": worst, **per_subset[worst]}}


def evaluate(
    run_dir: Path,
    data_dir: Path | None = None,
    split: str = "val",
    checkpoint: str = "best",
    device: str = "cpu",
    track: Callable[[Iterable, str], Iterable] = lambda items, _: items,
    subsets: bool = False,
    postprocessing: str | Path = "card",
    tta: bool | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any], Path]:
    """Evaluate ``RUN/checkpoints/<checkpoint>.pt`` on the run's ``split`` cases, written to
    ``RUN/evaluation/<split>``; returns what :func:`evaluate_cases` returns. ``postprocessing``
    and ``tta``: as :meth:`Segmenter.load` takes them."""
    if split not in SPLITS:
        raise ConfigurationError(f"--split must be one of {', '.join(SPLITS)}; got '{split}'")
    segmenter = Segmenter.load(run_dir, device=check_device(device), checkpoint=checkpoint,
                               postprocessing=postprocessing, tta=tta)
    cases = choose_cases(run_dir, segmenter.train_config, data_dir, split)
    return evaluate_cases(segmenter, cases, run_dir / "evaluation" / split, {"run": str(run_dir), "split": split},
                          track, subsets)


def evaluate_model(
    model: Path | None,
    data_dir: Path,
    out: Path,
    provider: str = "cpu",
    track: Callable[[Iterable, str], Iterable] = lambda items, _: items,
    subsets: bool = False,
    postprocessing: str | Path = "card",
    tta: bool | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any], Path]:
    """Evaluate an exported model (default: the shipped one) on every labelled case of
    ``data_dir``, written to ``out``; returns what :func:`evaluate_cases` returns.
    ``postprocessing`` and ``tta``: as :meth:`Segmenter.load` takes them."""
    segmenter = Segmenter.load(model, provider=provider, postprocessing=postprocessing, tta=tta)
    cases = _labelled(_discover(data_dir), data_dir, "no BraTS cases in the folder")
    return evaluate_cases(segmenter, cases, out, {"model": str(segmenter.source), "split": "all"}, track, subsets)


def evaluate_cases(
    segmenter: Segmenter,
    cases: Sequence[Case],
    out: Path,
    about: dict[str, Any],
    track: Callable[[Iterable, str], Iterable] = lambda items, _: items,
    subsets: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any], Path]:
    """Score ``cases`` (:func:`score_case`) and write ``out/cases.csv`` and ``summary.json``
    (``about``, the model file, mean/std/median per metric; with ``subsets`` also the
    15-subset table of :func:`subset_table`, per case and subset in ``subsets.csv``).
    Returns the per-case rows, the summary and ``out``."""
    scored = [score_case(segmenter, case, subsets) for case in track(cases, f"evaluating {len(cases)} case(s)")]
    rows = [row for row, _ in scored]
    summary = {
        **about, "checkpoint": str(segmenter.source), "cases": len(rows),
        "postprocessing": segmenter.postprocessing.to_dict() if segmenter.postprocessing else None,
        "tta": segmenter.tta,
        "metrics": summarize([{k: v for k, v in r.items() if k != "case_id"} for r in rows]),
    }
    if subsets:
        subset_rows = [row for _, per_subset in scored for row in per_subset]
        summary["subsets"] = subset_table(subset_rows)
        atomic_write_text(out / "subsets.csv", _csv(subset_rows))
    atomic_write_text(out / "cases.csv", _csv(rows))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return rows, summary, out


def _csv(rows: list[dict[str, Any]]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()
