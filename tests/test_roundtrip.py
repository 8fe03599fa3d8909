"""Round trip per layout on phantom cases: generate, discover, check, load through the
training and the inference chains, regions correct, inverse mapping back to the file grid."""

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import decollate_batch

from brats_cggm.data.dataset import make_dataset, make_loader
from brats_cggm.data.labels import labels_from_regions, to_brats2021
from brats_cggm.data.layouts import discover
from brats_cggm.data.phantom import write_phantoms
from brats_cggm.data.transforms import (
    PreprocessConfig,
    case_to_dict,
    inference_transforms,
    invert_prediction,
    train_transforms,
    val_transforms,
)
from brats_cggm.data.validation import inspect_case
from brats_cggm.errors import InconsistentCase

SIZE = (40, 48, 32)


def native_config(case) -> PreprocessConfig:
    """Preprocessing at the phantom's own voxel size (no resampling: exact comparisons)."""
    affine = nib.load(case.images[0]).affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return PreprocessConfig(spacing=tuple(spacing), orientation="RAS", patch_size=(16, 16, 16), num_samples=2)


def label_in_2021_numbering(case) -> np.ndarray:
    return to_brats2021(np.asanyarray(nib.load(case.label).dataobj), case.label_scheme)


@pytest.mark.parametrize("layout", ["brats2021", "brats2023", "msd"])
def test_round_trip(tmp_path, layout):
    write_phantoms(tmp_path, 2, size=SIZE, layout=layout, seed=11)
    found = discover(tmp_path)
    assert found.layout == layout and len(found.cases) == 2 and not found.problems
    assert all(inspect_case(c).ok for c in found.cases)
    case = found.cases[0]
    cfg = native_config(case)

    # training chain through the cached data set and loader
    loader = make_loader(make_dataset(found.cases, train_transforms(cfg)), batch_size=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 4, 16, 16, 16) and batch["label"].shape == (4, 3, 16, 16, 16)
    assert torch.isfinite(batch["image"]).all()

    # validation chain: the regions are the file's labels, voxel for voxel
    item = val_transforms(cfg)(case_to_dict(case))
    regions = item["label"].numpy().astype(bool)
    label = label_in_2021_numbering(case)
    assert regions[2].sum() == (label == 4).sum()
    assert regions[0].sum() == np.isin(label, (1, 4)).sum()
    assert regions[1].sum() == (label > 0).sum()
    back = labels_from_regions(regions, case.label_scheme)
    original = np.asanyarray(nib.load(case.label).dataobj)
    # the crop drops background only: every tumour voxel comes back with its label value
    assert np.bincount(back.ravel(), minlength=5)[1:].tolist() == np.bincount(original.ravel(), minlength=5)[1:].tolist()

    # inference chain: a prediction made on the network grid goes back to the file's grid
    chain = inference_transforms(cfg)
    data = chain(case_to_dict(case))
    image = data["image"]
    data["pred"] = (image[:1] != 0).float()  # the brain mask, on the preprocessed grid
    restored = invert_prediction(data, chain, nearest=True)
    reference = nib.load(case.images[0])
    assert tuple(restored.shape[1:]) == reference.shape[:3]
    assert np.allclose(restored.affine.numpy(), reference.affine, atol=1e-4)
    flair = np.asanyarray(reference.dataobj)
    flair = flair[..., case.channels[0]] if flair.ndim == 4 else flair
    assert np.array_equal(restored[0].numpy() > 0.5, flair != 0)


def test_loaders_raise_the_same_error_as_check(tmp_path):
    write_phantoms(tmp_path, 1, size=SIZE, layout="brats2021", seed=2)
    (case,) = discover(tmp_path).cases
    flair = nib.load(case.images[0])
    shifted = flair.affine.copy()
    shifted[0, 3] += 3
    nib.save(nib.Nifti1Image(np.asanyarray(flair.dataobj), shifted), case.images[1])
    expected = str(inspect_case(case).problems[0])
    with pytest.raises(InconsistentCase) as error:
        make_dataset([case], train_transforms(native_config(case)))
    assert str(error.value) == expected and str(case.images[1]) in expected


def test_batches_decollate_into_single_cases(tmp_path):
    write_phantoms(tmp_path, 2, size=SIZE, layout="brats2021", seed=3)
    cases = discover(tmp_path).cases
    cfg = native_config(cases[0])
    loader = make_loader(make_dataset(cases, inference_transforms(cfg), cache="none"), batch_size=1, shuffle=False)
    (single,) = decollate_batch(next(iter(loader)))
    assert single["image"].shape[0] == 4
