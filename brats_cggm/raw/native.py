"""Segment an ingested case and map the result back to the scanner: each region's probability
(TC, WT, ET) is resampled linearly from the atlas grid onto the reference (T1ce) series' own
grid through the inverse of the atlas registration, then thresholded and labelled (nested
regions -> BraTS labels); islands the model's clean-up removed in atlas space stay removed.

``predict --raw`` writes, per case, into ``OUT/<case>/`` (all at once, by renaming a finished
hidden folder):

* ``<case>_seg.nii.gz``: labels {0, 1, 2, 4} on exactly the reference series' grid
* ``<case>_seg.dcm``: the same regions as a DICOM SEG referencing that series (DICOM input)
* ``<case>.json``: volumes (ml) per region on the native grid, the sequences present, the
  model, and the ingest record
* ``atlas/``: the atlas-space prediction (``<case>.nii.gz`` and its JSON)
* ``brats/<case>/``: the BraTS-ready case the model saw (with ``ingest.json``)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from brats_cggm.data.labels import REGIONS, labels_from_regions, to_scheme
from brats_cggm.errors import InconsistentCase
from brats_cggm.inference.outputs import nifti_bytes, write_prediction
from brats_cggm.inference.prediction import Prediction
from brats_cggm.raw.grids import affine_of, from_xyz, to_xyz
from brats_cggm.raw.ingest import IngestedCase, staged, write_case


def native_regions(prediction: Prediction, case: IngestedCase, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``([3, x, y, z]`` float32 probabilities of TC, WT, ET, (x, y, z) BraTS 2021 label map)
    on the reference series' grid."""
    import SimpleITK as sitk

    probabilities = np.array(prediction.probabilities, dtype=np.float32, copy=True)
    removed = (probabilities > threshold) & ~prediction.regions  # the clean-up's islands
    probabilities[removed] = 0.0
    inverse = case.to_reference.GetInverse()  # reference point -> atlas point
    native = np.stack([
        to_xyz(sitk.Resample(from_xyz(p, case.atlas_image), case.reference_image, inverse,
                                   sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        for p in probabilities
    ])
    return native, labels_from_regions(native > threshold)


def native_affine(case: IngestedCase) -> tuple[np.ndarray, Any]:
    """The reference series' voxel -> RAS matrix and NIfTI header: the file's own for NIfTI
    input (the output matches it exactly), SimpleITK's geometry for DICOM."""
    import nibabel as nib

    series = case.reference_series
    if series.kind == "nifti":
        image = nib.load(series.files[0])
        return image.affine, image.header
    return affine_of(case.reference_image), None


def native_prediction(prediction: Prediction, case: IngestedCase, threshold: float = 0.5,
                      label_scheme: str = "brats2021") -> Prediction:
    """The atlas-space ``prediction`` as a prediction on the reference series' own grid (labels,
    probabilities, that grid's affine and, for NIfTI input, its header)."""
    probabilities, labels = native_regions(prediction, case, threshold)
    affine, header = native_affine(case)
    return Prediction(
        case.case_id, to_scheme(labels, label_scheme).astype(np.uint8), label_scheme,
        probabilities, affine, header, prediction.sequences_used, prediction.tta,
        seconds=prediction.seconds + sum(case.record["seconds"].values()),  # ingest and segmentation
        inputs=dict(case.record["inputs"]),
        postprocessing=prediction.postprocessing,
    )


def write_raw_prediction(prediction: Prediction, native: Prediction, case: IngestedCase, out: Path,
                         model: dict[str, Any], overwrite: bool = False) -> dict[str, Any]:
    """Write one raw case's results into ``out/<case>/`` (see the module's docstring): the
    atlas-space ``prediction`` and ``native``, the same on the reference series' grid
    (:func:`native_prediction`); returns the report (``<case>.json``)."""
    with staged(Path(out) / case.case_id, overwrite) as staging:
        seg_name = f"{case.case_id}_seg.nii.gz"
        (staging / seg_name).write_bytes(nifti_bytes(native.labels, native.affine, native.header))
        files: dict[str, Any] = {"labels_native": seg_name}
        if case.reference_series.kind == "dicom":
            files["dicom_seg"] = _write_seg(native.regions, case, staging / f"{case.case_id}_seg.dcm")
        atlas = write_prediction(prediction, staging / "atlas", model=model)
        files["atlas"] = f"atlas/{atlas['files']['labels']}"
        write_case(case, staging / "brats")
        files["brats_ready"] = f"brats/{case.case_id}"
        report = {
            **native.summary(),
            "grid": f"the {case.reference.upper()} series as acquired ({case.reference_series.label})",
            "volumes_ml_atlas": {k: round(v, 3) for k, v in prediction.volumes_ml().items() if k in REGIONS},
            "files": files,
            "model": model,
            "seconds": {"ingest": case.record["seconds"], "segment": round(prediction.seconds, 3)},
            "ingest": case.record,
        }
        (staging / f"{case.case_id}.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _write_seg(regions: np.ndarray, case: IngestedCase, path: Path) -> str:
    from brats_cggm.raw.dicom_seg import write_seg

    try:
        return write_seg(regions, case.reference_series.files, path).name
    except (ValueError, AttributeError, TypeError) as error:  # highdicom refuses the source headers
        raise InconsistentCase(case.case_id, f"cannot write the DICOM SEG over {case.reference_series.label}: "
                                             f"{str(error).splitlines()[0]}") from None
