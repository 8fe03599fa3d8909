"""The files a prediction writes, all on the input's grid with its header:

* ``<case>.nii.gz``: the label map (uint8; BraTS 2021 or 2023 numbering)
* ``<case>_probabilities.nii.gz``: TC, WT, ET probabilities, 4-D (optional)
* ``<case>_contribution_<sequence>.nii.gz``: the sequence's contribution to TC, WT, ET, 4-D
  (with contribution maps; float32 on the full grid, or with ``compact_contributions``
  int8 with ``scl_slope``, cropped to one box for all sequences: see compact.py)
* ``<case>.json``: volumes (ml), sequences used, contribution shares, the model; written
  last, so its presence means the case is complete

Every file is written atomically; when one fails, the files of the case written before it
are removed again.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from brats_cggm.inference.compact import compact_nifti, shared_box
from brats_cggm.inference.prediction import Prediction
from multimodal_general.io import atomic_write, atomic_write_text


def summary_path(out_dir: Path, case_id: str) -> Path:
    return Path(out_dir) / f"{case_id}.json"


def is_done(out_dir: Path, case_id: str) -> bool:
    """Whether a complete prediction of ``case_id`` is already in ``out_dir``."""
    return summary_path(out_dir, case_id).is_file() and (Path(out_dir) / f"{case_id}.nii.gz").is_file()


def nifti_bytes(data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None) -> bytes:
    """A gzip-compressed NIfTI-1 of ``data`` (3-D, or 4-D with channels last) with
    ``affine`` and, when given, the rest of ``header`` (units, descriptions, codes)."""
    image = nib.Nifti1Image(data, affine, header.copy() if header is not None else None)
    image.header.set_data_dtype(data.dtype)
    if header is not None:  # keep the input's sform/qform codes; the matrices are ``affine``
        image.set_sform(affine, int(header["sform_code"]) or 1)
        image.set_qform(affine, int(header["qform_code"]) or 1)
    return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)


def channels_last(maps: np.ndarray) -> np.ndarray:
    """``[C, X, Y, Z]`` -> ``[X, Y, Z, C]`` (NIfTI keeps the channels in the 4th dimension)."""
    return np.ascontiguousarray(np.moveaxis(maps, 0, -1), dtype=np.float32)


def write_prediction(prediction: Prediction, out_dir: Path, probabilities: bool = False,
                     model: dict[str, Any] | None = None, compact_contributions: bool = False) -> dict[str, Any]:
    """Write ``prediction``'s files into ``out_dir``; returns the JSON summary written.
    ``compact_contributions``: the contribution maps as int8 in one box (compact.py), and
    the box in the summary's ``files.contributions_box`` (first voxel, shape)."""
    out_dir, case = Path(out_dir), prediction.case_id
    files: dict[str, Any] = {"labels": f"{case}.nii.gz"}
    maps: dict[str, Callable[[], bytes]] = {
        files["labels"]: lambda: nifti_bytes(prediction.labels.astype(np.uint8), prediction.affine, prediction.header)}
    if probabilities:
        files["probabilities"] = f"{case}_probabilities.nii.gz"
        maps[files["probabilities"]] = lambda: nifti_bytes(
            channels_last(prediction.probabilities), prediction.affine, prediction.header)
    if prediction.contributions:
        files["contributions"] = {}
        box = shared_box(prediction.contributions.values()) if compact_contributions else None
        if box is not None:
            files["contributions_box"] = {"start": [s.start for s in box], "shape": [s.stop - s.start for s in box]}
        for sequence, values in prediction.contributions.items():
            name = f"{case}_contribution_{sequence}.nii.gz"
            files["contributions"][sequence] = name
            maps[name] = partial(_contribution_bytes, values, prediction, box)
    summary = {**prediction.summary(), "files": files, "model": model or {}}
    written: list[Path] = []
    try:
        for name, encode in maps.items():
            payload = encode()
            written.append(atomic_write(out_dir / name, lambda handle, payload=payload: handle.write(payload)))
        written.append(atomic_write_text(summary_path(out_dir, case), json.dumps(summary, indent=1) + "\n"))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return summary


def _contribution_bytes(values: np.ndarray, prediction: Prediction, box: tuple[slice, ...] | None) -> bytes:
    if box is None:
        return nifti_bytes(channels_last(values), prediction.affine, prediction.header)
    return compact_nifti(values, prediction.affine, prediction.header, box)
