"""The numpy chain (grid.py, windows.py: no torch, no MONAI) against the MONAI chain
(monai_chain.py: the transforms training and evaluation use), step by step and whole.

Whole cases go through both chains with the same ONNX Runtime session; the label maps
must agree on >= 99.99 % of the voxels and the probabilities (and contribution maps) to
1e-3, on phantoms on many grids (always) and on every real case of ../shared/data/real
(skipped, with the reason, where that folder is absent).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from inference_cases import affine_from, write_case
from monai.data import MetaTensor
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.transforms import Orientation, Spacing
from test_real_cases import REAL
from training_cases import torch_threads

from brats_cggm import MODALITIES, models
from brats_cggm.data.layouts import discover
from brats_cggm.data.phantom import generate_case
from brats_cggm.data.preprocessing import PreprocessConfig
from brats_cggm.data.transforms import image_transforms
from brats_cggm.inference.grid import orient, preprocess, spacing_grid
from brats_cggm.inference.postprocessing import Postprocessing
from brats_cggm.inference.segmenter import Segmenter
from brats_cggm.inference.windows import gaussian_importance, window_starts

DEFAULT_MODEL = models.default().path
DEMO_MODEL = models.find("brats_cggm_phantom_demo").path  # 3 mm, four branches
SAME_LABELS = 0.9999
MAX_PROBABILITY_DIFFERENCE = 1e-3


@pytest.fixture(scope="module")
def chains():
    """(numpy, monai) segmenters of the shipped 2 mm model and of the 3 mm demo model, without the
    card's mirroring unless a test asks for it (the chains agree or not whatever the network does)."""
    with torch_threads(1):
        yield {path.stem: (Segmenter.load(path, threads=1, chain="numpy", tta=False),
                           Segmenter.load(path, threads=1, chain="monai", tta=False))
               for path in (DEFAULT_MODEL, DEMO_MODEL)}


def agreement(a, b) -> tuple[float, float]:
    """Share of identical label voxels and the largest difference of any map."""
    assert a.shape == b.shape and np.array_equal(a.affine, b.affine)
    same = float((a.labels == b.labels).mean())
    diff = float(np.abs(a.probabilities - b.probabilities).max())
    for sequence in a.contributions:
        diff = max(diff, float(np.abs(a.contributions[sequence] - b.contributions[sequence]).max()))
    return same, diff


# ------------------------------------------------------------------ one step at a time


@pytest.mark.parametrize("size,roi,overlap", [(100, 64, 0.5), (64, 64, 0.5), (77, 48, 0.25), (49, 48, 0.5),
                                              (130, 32, 0.0), (33, 16, 0.9)])
def test_window_starts_are_monais(size, roi, overlap):
    step = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    monai = sorted({s[0].start for s in dense_patch_slices((size,), (roi,), (step,))})
    assert window_starts(size, roi, overlap) == monai


@pytest.mark.parametrize("patch", [(64, 64, 64), (48, 32, 17), (5, 6, 7)])
def test_the_gaussian_is_monais(patch):
    monai = compute_importance_map(patch, mode="gaussian", sigma_scale=0.125).numpy()
    ours = gaussian_importance(patch)
    assert ours.dtype == np.float32 and np.abs(ours - monai).max() <= 1e-6


GRIDS = {  # axes, spacing (mm), origin (mm), rotation about z (degrees)
    "RAS 1 mm": ("RAS", (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), 0.0),
    "LPS BraTS-like": ("LPS", (1.0, 1.0, 1.0), (0.0, 239.0, 0.0), 0.0),
    "flipped, odd origin": ("RAS", (1.0, 1.0, 1.0), (-120.5, 37.25, -80.0), 0.0),
    "anisotropic LIA": ("LIA", (0.9, 1.3, 2.5), (10.0, -5.0, 3.0), 0.0),
    "oblique 17 degrees": ("RAS", (1.0, 1.0, 1.0), (5.0, 5.0, 5.0), 17.0),
    "card spacing already": ("PSR", (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), 0.0),
}


def sheared(affine: np.ndarray) -> np.ndarray:
    out = affine.copy()
    out[0, 1] += 0.2  # x moves with the second array axis: no rotation can undo it
    return out


@pytest.mark.parametrize("grid", [*GRIDS, "sheared"])
@pytest.mark.parametrize("spacing", [(2.0, 2.0, 2.0), (3.0, 1.5, 2.5)])
def test_preprocessing_is_monais(grid, spacing):
    """Orientation, spacing, noise floor, crop and z-score: the same grid (affine, shape,
    crop) and the same network input as MONAI's chain."""
    axes, voxel, origin, degrees = GRIDS.get(grid, GRIDS["anisotropic LIA"])
    affine = affine_from(axes, voxel, origin, degrees)
    if grid == "sheared":
        affine = sheared(affine)
    rng = np.random.default_rng(0)
    shape = (41, 37, 30)
    image = np.zeros((4, *shape), dtype=np.float32)
    image[:, 5:35, 8:30, 4:26] = rng.uniform(1, 2000, (4, 30, 22, 22)).round()
    image[2] = 0  # a missing sequence stays zeros
    cfg = PreprocessConfig(spacing=spacing)
    arrays = {m: image[i] for i, m in enumerate(MODALITIES) if i != 2}
    ours, geometry = preprocess(arrays, MODALITIES, affine, cfg)
    data = image_transforms(cfg)({"image": MetaTensor(torch.from_numpy(image), affine=torch.as_tensor(affine))})
    monai = data["image"]
    assert ours.shape == tuple(monai.shape)
    assert np.abs(ours - monai.numpy()).max() <= 1e-4
    crop = np.eye(4)
    crop[:3, 3] = [a for a, _ in geometry.box]
    assert np.allclose(geometry.grid_affine @ crop, monai.affine.numpy(), atol=1e-6)


@pytest.mark.parametrize("grid", list(GRIDS))
def test_the_spacing_grid_is_monais(grid):
    axes, voxel, origin, degrees = GRIDS[grid]
    affine = affine_from(axes, voxel, origin, degrees)
    shape = (50, 61, 43)
    image = MetaTensor(torch.zeros(1, *shape), affine=torch.as_tensor(affine))
    oriented = Orientation(axcodes="RAS", labels=None)(image)
    resampled = Spacing(pixdim=(2.0, 1.7, 3.0))(oriented)
    ornt_affine, ornt_shape = oriented.affine.numpy(), tuple(oriented.shape[1:])
    assert orient(np.zeros((1, *shape)), _ornt(affine)).shape[1:] == ornt_shape
    grid, grid_shape = spacing_grid(ornt_affine, ornt_shape, (2.0, 1.7, 3.0))
    assert grid_shape == tuple(resampled.shape[1:]) and np.allclose(grid, resampled.affine.numpy(), atol=1e-9)


def _ornt(affine):
    from nibabel import orientations

    return orientations.ornt_transform(orientations.io_orientation(affine), orientations.axcodes2ornt("RAS"))


# ------------------------------------------------------------------ whole cases


@pytest.mark.parametrize("grid", [*GRIDS, "sheared"])
def test_phantoms_on_every_grid_agree(chains, grid, tmp_path):
    axes, voxel, origin, degrees = GRIDS.get(grid, GRIDS["anisotropic LIA"])
    affine = affine_from(axes, voxel, origin, degrees)
    if grid == "sheared":
        affine = sheared(affine)
    images = generate_case(7, (72, 64, 56)).images
    write_case(tmp_path, "case", {m: images[m] for m in MODALITIES}, affine)
    case = discover(tmp_path).cases[0]
    numpy_chain, monai_chain = chains["brats_cggm_real"]
    a, b = numpy_chain.predict_case(case), monai_chain.predict_case(case)
    same, diff = agreement(a, b)
    assert same >= SAME_LABELS and diff <= MAX_PROBABILITY_DIFFERENCE, (grid, same, diff)
    assert a.labels.any(), "the phantom's tumour is found"


@pytest.mark.parametrize("options", [{"tta": True}, {"contributions": "shapley"},
                                     {"contributions": "occlusion", "label_scheme": "brats2023"}])
def test_every_option_agrees_on_both_models(chains, options, tmp_path):
    images = generate_case(3, (64, 64, 64)).images
    write_case(tmp_path, "case", {m: images[m] for m in ("flair", "t1ce", "t2")},
               affine_from("LPS", (1.0, 1.0, 1.0), (0.0, 63.0, 0.0)))
    case = discover(tmp_path, partial=True).cases[0]
    for name, (numpy_chain, monai_chain) in chains.items():
        a, b = numpy_chain.predict_case(case, **options), monai_chain.predict_case(case, **options)
        same, diff = agreement(a, b)
        assert same >= SAME_LABELS and diff <= MAX_PROBABILITY_DIFFERENCE, (name, options, same, diff)
        assert set(a.contributions) == set(b.contributions)


def test_both_chains_apply_the_cards_postprocessing_alike(tmp_path):
    """The same rules through both chains: the label maps agree as the plain ones do, and
    each is exactly the rules applied to its chain's plain map."""
    rules = {"WT": {"min_ml": 0.5, "max_distance_mm": 10}, "TC": {"min_fraction_of_largest": 0.5},
             "ET": {"min_ml": 0.2}, "small_et_ml": 1e4}
    (tmp_path / "rules.json").write_text(json.dumps(rules))
    images = generate_case(3, (64, 64, 64)).images
    write_case(tmp_path, "case", {m: images[m] for m in MODALITIES}, affine_from("LPS", (1.0, 1.0, 1.0), (0.0, 63.0, 0.0)))
    case = discover(tmp_path).cases[0]
    with torch_threads(1):
        plain = [Segmenter.load(DEFAULT_MODEL, threads=1, chain=c, postprocessing="off").predict_case(case)
                 for c in ("numpy", "monai")]
        cleaned = [Segmenter.load(DEFAULT_MODEL, threads=1, chain=c, postprocessing=tmp_path / "rules.json").predict_case(case)
                   for c in ("numpy", "monai")]
    for before, after in zip(plain, cleaned):
        expected, applied = Postprocessing.from_dict(rules)(before.labels, before.affine)
        assert np.array_equal(after.labels, expected) and after.postprocessing == applied
        assert applied["small_et_relabelled"]
    same, diff = agreement(*cleaned)
    assert same >= SAME_LABELS and diff <= MAX_PROBABILITY_DIFFERENCE
    assert cleaned[0].postprocessing == cleaned[1].postprocessing or same < 1


def test_an_onnx_file_takes_the_numpy_chain_and_a_run_folder_monais(chains):
    numpy_chain, monai_chain = chains["brats_cggm_real"]
    assert Segmenter.load(DEFAULT_MODEL).chain == "numpy" and numpy_chain.chain == "numpy"
    assert monai_chain.chain == "monai"


#: every full case (partial/ holds two-sequence cases, one folder deeper)
REAL_CASES = sorted(p.name for p in REAL.glob("*/*") if p.is_dir() and p.name != "labels"
                    and p.parent.name != "partial") if REAL.is_dir() else []
#: the first case of each folder (each its own grid and source) in the default suite, the rest
#: behind the slow marker (the shipped model is three networks: every case costs seconds)
FIRST_OF_FOLDER = {min(p.name for p in REAL.glob(f"{folder.name}/*") if p.name in REAL_CASES)
                   for folder in REAL.glob("*") if any(p.name in REAL_CASES for p in folder.glob("*"))} if REAL.is_dir() else set()


@pytest.mark.skipif(not REAL.is_dir(), reason=f"no real BraTS cases at {REAL} (a fresh clone has none)")
@pytest.mark.parametrize("name", [pytest.param(name, marks=() if name in FIRST_OF_FOLDER else pytest.mark.slow)
                                  for name in REAL_CASES] or ["none"])
def test_real_cases_agree(chains, name):
    folder = next(p for p in REAL.glob(f"*/{name}"))
    case = next(c for c in discover(folder.parent, partial=True).cases if c.case_id == name)
    numpy_chain, monai_chain = chains["brats_cggm_real"]
    a, b = numpy_chain.predict_case(case), monai_chain.predict_case(case)
    same, diff = agreement(a, b)
    print(f"{name}: {100 * same:.4f} % identical labels, max |dp| {diff:.1e}")
    assert same >= SAME_LABELS and diff <= MAX_PROBABILITY_DIFFERENCE
