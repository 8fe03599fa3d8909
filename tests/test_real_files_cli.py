"""``brats-cggm check`` and ``brats-cggm predict`` (the numpy chain, as a user runs them) on
the real files of ``../shared/data/real``: BraTS 2023 names, BraTS-MET-00110-000 (its
direction flipped relative to the others), BRATS_HG0015 (160 x 216 x 176, non-zero
origin) and Brats18_TCIA10_637_1 (int16 scaled to the full range). Every label map must
come back on exactly its input's grid (shape, affine, sform/qform codes). Skipped, with
the reason, where that folder is absent (a fresh clone)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from inference_cases import cli
from test_real_cases import REAL

from brats_cggm import models
from brats_cggm.data.layouts import discover
from brats_cggm.data.validation import load_sequences
from brats_cggm.inference.segmenter import Segmenter

DEFAULT_MODEL = models.default().path

pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"no real BraTS cases at {REAL} (a fresh clone has none)")

CASES = {  # case -> (its folder, the file whose grid the label map must keep)
    "BraTS-GLI-00001-000": ("brats2023", "BraTS-GLI-00001-000-t1c.nii.gz"),
    "BraTS-MET-00110-000": ("brats2023", "BraTS-MET-00110-000-t1c.nii.gz"),
    "BRATS_HG0015": ("brats2012", "BRATS_HG0015_t1ce.nii.gz"),
    "Brats18_TCIA10_637_1": ("brats2018", "Brats18_TCIA10_637_1_t1ce.nii.gz"),
}


@pytest.mark.parametrize("folder,count", [("brats2018", 12), ("brats2023", 2), ("brats2012", 1)])
def test_check_passes_every_real_folder(folder, count):
    code, text = cli("check", REAL / folder)
    assert code == 0 and f"all {count} case(s) are fine" in text, text
    if folder == "brats2023":  # the MET case's flipped direction is seen, not refused
        assert "RAS" in text and "LPS" in text, text


def same_grid(output: nib.Nifti1Image, source: nib.Nifti1Image) -> None:
    assert output.shape == source.shape
    assert np.allclose(output.affine, source.affine, atol=1e-5), (output.affine, source.affine)
    for code in ("sform_code", "qform_code"):
        assert int(output.header[code]) == int(source.header[code]) or int(source.header[code]) == 0, code
    assert np.allclose(output.header.get_zooms()[:3], source.header.get_zooms()[:3])


@pytest.mark.parametrize("name", list(CASES))
def test_predict_keeps_each_real_case_on_its_grid(name, tmp_path):
    folder, reference = CASES[name]
    files = sorted(p for p in (REAL / folder / name).glob("*.nii.gz") if "seg" not in p.name)
    scheme = "brats2023" if folder == "brats2023" else "brats2021"
    args = [a for f in files for a in ("--input", f)]
    code, text = cli("predict", *args, "--out", tmp_path, "--probabilities", "--label-scheme", scheme)
    assert code == 0, text
    source = nib.load(REAL / folder / name / reference)
    labels = nib.load(tmp_path / f"{name}.nii.gz")
    same_grid(labels, source)
    data = np.asarray(labels.dataobj)
    assert labels.get_data_dtype() == np.uint8
    assert set(np.unique(data)) <= ({0, 1, 2, 3} if scheme == "brats2023" else {0, 1, 2, 4})
    probabilities = nib.load(tmp_path / f"{name}_probabilities.nii.gz")
    assert probabilities.shape == (*source.shape, 3) and np.allclose(probabilities.affine, source.affine, atol=1e-5)
    summary = json.loads((tmp_path / f"{name}.json").read_text())
    assert summary["shape"] == list(source.shape) and summary["volumes_ml"]["WT"] > 5.0, summary["volumes_ml"]
    if name == "Brats18_TCIA10_637_1":  # a training case of the shipped model: the point is the int16 range
        truth = np.asarray(nib.load(REAL / folder / name / f"{name}_seg.nii.gz").dataobj) > 0
        found = data > 0
        assert 2 * (truth & found).sum() / (truth.sum() + found.sum()) > 0.8


def test_full_range_int16_is_normalised_per_case():
    """Brats18_TCIA10_637_1 (max 32767) and the same case at 1/16 of its intensities: the
    per-case z-score makes them the same input; the label maps are identical."""
    case = next(c for c in discover(REAL / "brats2018").cases if c.case_id == "Brats18_TCIA10_637_1")
    volumes = load_sequences(case)
    assert max(int(v.data.max()) for v in volumes.values()) == 32767
    affine = next(iter(volumes.values())).affine
    segmenter = Segmenter.load(DEFAULT_MODEL, threads=1)
    full = segmenter.predict_arrays({m: v.data for m, v in volumes.items()}, affine)
    small = segmenter.predict_arrays({m: v.data.astype(np.float32) / 16 for m, v in volumes.items()}, affine)
    assert np.array_equal(full.labels, small.labels) and full.labels.any()
    assert np.abs(full.probabilities - small.probabilities).max() < 1e-3
