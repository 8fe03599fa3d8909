"""Compact contribution maps (brats_cggm/inference/compact.py): int8 with the scale in the
header, cropped to one box, and still in the right place in world coordinates for the
readers people overlay them with (nibabel; ITK through SimpleITK, as 3D Slicer and ITK-SNAP read NIfTI)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from brats_cggm.inference.compact import LEVELS, box_affine, shared_box, slope
from brats_cggm.inference.outputs import write_prediction
from brats_cggm.inference.prediction import Prediction

SHAPE = (30, 26, 20)
#: LPS-stored (BraTS 2018), flipped (BraTS-MET-00110-000) and oblique grids, non-zero origins
AFFINES = {
    "lps": np.array([[-1.0, 0, 0, 120], [0, -1, 0, 119], [0, 0, 1, -70], [0, 0, 0, 1]]),
    "ras": np.array([[1.0, 0, 0, -90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]]),
    "oblique": np.array([[0.0, 0, 1.2, 5], [-0.94, 0.34, 0, 40], [0.34, 0.94, 0, -12], [0, 0, 0, 1]]),
}


def prediction(affine: np.ndarray, seed: int = 0) -> Prediction:
    """A case whose contribution maps are non-zero only inside a box, of different sizes per sequence."""
    rng = np.random.default_rng(seed)
    contributions = {}
    for sequence, top in (("flair", 0.8), ("t1", 0.05), ("t1ce", 0.3)):
        maps = np.zeros((3, *SHAPE), np.float32)
        maps[:, 4:25, 3:21, 2:17] = rng.uniform(-top, top, (3, 21, 18, 15))
        contributions[sequence] = maps
    contributions["t1"][:, 2, 10, 10] = 0.05  # the t1 map reaches out of the others' box
    labels = np.zeros(SHAPE, np.uint8)
    labels[10:14, 10:14, 8:12] = 2
    header = nib.Nifti1Header()
    header.set_sform(affine, 1)
    header.set_qform(affine, 1)
    return Prediction("case", labels, "brats2021", np.zeros((3, *SHAPE), np.float32), affine, header,
                      ("flair", "t1", "t1ce", "t2"), contributions=contributions, contribution_method="occlusion")


@pytest.mark.parametrize("grid", list(AFFINES))
def test_compact_maps_read_back_within_half_a_step_in_place(tmp_path, grid):
    affine = AFFINES[grid]
    result = prediction(affine)
    summary = write_prediction(result, tmp_path / "compact", compact_contributions=True)
    full = write_prediction(result, tmp_path / "full")
    box = summary["files"]["contributions_box"]
    assert box == {"start": [2, 3, 2], "shape": [23, 18, 15]}  # the union of every sequence's non-zero voxels
    assert json.loads((tmp_path / "compact" / "case.json").read_text())["files"]["contributions_box"] == box
    crop = tuple(slice(a, a + n) for a, n in zip(box["start"], box["shape"]))
    for sequence, maps in result.contributions.items():
        name = summary["files"]["contributions"][sequence]
        image = nib.load(tmp_path / "compact" / name)
        assert image.get_data_dtype() == np.int8 and image.shape == (*box["shape"], 3)
        step = float(np.abs(maps).max()) / LEVELS
        assert image.dataobj.slope == pytest.approx(step, rel=1e-6)
        values = image.get_fdata()  # the slope applied
        expected = np.moveaxis(maps[(slice(None), *crop)], 0, -1)
        assert np.abs(values - expected).max() <= step / 2 * (1 + 1e-5)
        assert not np.delete(maps, np.s_[2:25], axis=1).any()  # nothing outside the box was dropped
        # voxel (0, 0, 0) of the crop is voxel ``start`` of the input's grid, in world coordinates
        assert np.allclose(image.affine @ [0, 0, 0, 1], affine @ [*box["start"], 1])
        assert np.allclose(image.affine[:3, :3], affine[:3, :3])
        assert int(image.header["sform_code"]) == int(image.header["qform_code"]) == 1
        assert (tmp_path / "compact" / name).stat().st_size < (tmp_path / "full" / full["files"]["contributions"][sequence]).stat().st_size / 3  # random values: int8 vs float32


def test_itk_reads_the_scale_and_the_place(tmp_path):
    """ITK (3D Slicer's and ITK-SNAP's reader) applies scl_slope and puts the crop where it was."""
    sitk = pytest.importorskip("SimpleITK", reason="the ITK check needs SimpleITK")
    affine = AFFINES["lps"]
    result = prediction(affine)
    summary = write_prediction(result, tmp_path, compact_contributions=True)
    start = summary["files"]["contributions_box"]["start"]
    image = sitk.ReadImage(str(tmp_path / summary["files"]["contributions"]["flair"]))
    voxels = sitk.GetArrayFromImage(image)  # [z, y, x, channel] (or [channel, z, y, x] for 4-D)
    world_ras = affine @ [*start, 1]
    assert np.allclose(image.GetOrigin()[:3], [-world_ras[0], -world_ras[1], world_ras[2]])  # ITK is LPS
    assert np.abs(voxels).max() == pytest.approx(float(np.abs(result.contributions["flair"]).max()), rel=1e-3)


def test_zero_maps_and_the_box_helpers():
    zeros = np.zeros((3, 4, 5, 6), np.float32)
    assert slope(zeros) == 1.0
    assert shared_box([zeros]) == (slice(0, 1),) * 3
    tiny = zeros.copy()
    tiny[0, 1, 2, 3], tiny[1, 3, 4, 5] = 1.0, 1.0 / LEVELS / 2  # the second rounds to 0 (half to even)
    assert shared_box([tiny]) == (slice(1, 2), slice(2, 3), slice(3, 4))
    affine = AFFINES["oblique"]
    box = (slice(3, 9), slice(1, 4), slice(2, 8))
    assert np.allclose(box_affine(affine, box) @ [1, 2, 3, 1], affine @ [4, 3, 5, 1])
