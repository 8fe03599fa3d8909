"""Evaluate a trained run on whole cases, on each case's original grid.

Each case goes through the segmenter (the run's preprocessing, sliding-window inference,
back to the grid of its files), the same code as ``brats-cggm predict``; the regions are
then compared with the case's own label file at its own voxel size, as the BraTS
challenge scores them. Writes ``RUN/evaluation/<split>/cases.csv`` (one row per case)
and ``summary.json`` (mean, std, median per metric).
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
from brats_cggm.metrics import REGIONS, region_metrics, summarize
from brats_cggm.training.config import TrainConfig
from multimodal_general.io import atomic_write_text

SPLITS = ("val", "test", "all")


def choose_cases(run_dir: Path, config: TrainConfig, data_dir: Path | None, split: str) -> list[Case]:
    """``val``: the run's validation cases; ``test``: cases of the folder the run's split
    does not name (never seen in training or model selection); ``all``: every case."""
    folder = data_dir or (Path(config.data.dir) if config.data.dir else None)
    if folder is None:
        raise ConfigurationError("no data folder: give --data DIR")
    found = discover(folder, config.data.layout if data_dir is None else None)
    if found.problems:
        raise found.problems[0]
    fold = load_split(run_dir / "split.json")["folds"][config.data.fold]
    used = set(fold["train"]) | set(fold["val"])
    chosen = {
        "val": [c for c in found.cases if c.case_id in set(fold["val"])],
        "test": [c for c in found.cases if c.case_id not in used],
        "all": found.cases,
    }[split]
    if not chosen:
        raise BadInputFile(folder, f"no {split} cases of this run in the folder")
    missing = [c.case_id for c in chosen if c.label is None]
    if missing:
        raise BadInputFile(folder, f"case {missing[0]} has no label map; evaluation needs one")
    return chosen


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


def evaluate_case(segmenter: Segmenter, case: Case) -> dict[str, Any]:
    """Metrics of one case, on its original grid."""
    validate_case(case)
    prediction = segmenter.predict_case(case)
    reference, spacing = reference_regions(case)
    row = {"case_id": case.case_id}
    row.update(region_metrics(torch.as_tensor(prediction.regions), reference, spacing, hd95=True))
    return row


def evaluate_subsets(segmenter: Segmenter, case: Case) -> list[dict[str, Any]]:
    """Dice of one case with each of the 15 non-empty subsets of its sequences (the others
    left out, as a missing sequence is: switched off through the modality mask; early fusion
    gets a zero channel), on its original grid."""
    validate_case(case)
    volumes = load_sequences(case)
    if len(volumes) < len(MODALITIES):
        raise InconsistentCase(case.case_id, "scoring the subsets of the sequences needs all four")
    reference, spacing = reference_regions(case)
    affine, header = volumes[MODALITIES[0]].affine, volumes[MODALITIES[0]].header
    rows = []
    for subset in SUBSETS:
        prediction = segmenter.predict_arrays({m: volumes[m].data for m in subset}, affine, case.case_id, header,
                                              any_subset=True)
        dice = region_metrics(torch.as_tensor(prediction.regions), reference, spacing, hd95=False)
        rows.append({"case_id": case.case_id, "subset": subset_name(subset), **dice})
    return rows


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
) -> tuple[list[dict[str, Any]], dict[str, Any], Path]:
    """Evaluate ``RUN/checkpoints/<checkpoint>.pt``; returns the per-case rows, the summary
    and the folder they were written to. With ``subsets`` the summary also holds the
    15-subset table (:func:`subset_table`; per case and subset in ``subsets.csv``)."""
    if split not in SPLITS:
        raise ConfigurationError(f"--split must be one of {', '.join(SPLITS)}; got '{split}'")
    segmenter = Segmenter.load(run_dir, device=check_device(device), checkpoint=checkpoint)
    path = Path(segmenter.source)
    cases = choose_cases(run_dir, segmenter.train_config, data_dir, split)
    rows = [evaluate_case(segmenter, case) for case in track(cases, f"evaluating {split}")]
    summary = {
        "run": str(run_dir), "checkpoint": str(path), "split": split, "cases": len(rows),
        "metrics": summarize([{k: v for k, v in r.items() if k != "case_id"} for r in rows]),
    }
    out = run_dir / "evaluation" / split
    if subsets:
        subset_rows = [row for case in track(cases, "evaluating 15 subsets") for row in evaluate_subsets(segmenter, case)]
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
