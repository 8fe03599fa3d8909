"""Training, validation and inference chains on small synthetic cases written with nibabel."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import NormalizeIntensityd, RandomizableTrait

from brats_cggm import MODALITIES
from brats_cggm.data.dataset import make_dataset, make_loader
from brats_cggm.data.labels import to_scheme
from brats_cggm.data.layouts import LAYOUTS, discover
from brats_cggm.data.transforms import (
    PreprocessConfig,
    case_to_dict,
    inference_transforms,
    invert_prediction,
    train_transforms,
    val_transforms,
)
from brats_cggm.errors import BadInputFile, ConfigurationError

SHAPE = (40, 48, 36)
#: LPS voxel axes with an offset: orientation to RAS flips two axes
LPS_1MM = np.array([[-1.0, 0, 0, 20], [0, -1.0, 0, 30], [0, 0, 1.0, -10], [0, 0, 0, 1]])
#: LPI voxel axes, 1.2 mm in-plane and 1.5 mm slices: orientation and spacing both act
LPI_ANISO = np.array([[-1.2, 0, 0, 5], [0, -1.2, 0, 7], [0, 0, -1.5, 30], [0, 0, 0, 1]])
#: MSD's 4-D file holds the sequences in this (shuffled) order
MSD_NAMES = ("T2w", "FLAIR", "t1gd", "T1w")
MSD_CANONICAL = {"flair": "flair", "t1w": "t1", "t1gd": "t1ce", "t2w": "t2"}
SMALL = {"patch_size": (16, 20, 24), "num_samples": 4}


def phantom(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Four sequences and a BraTS 2021 label map: an ellipsoid brain (zero outside) and a
    tumour with an oedema shell (2), an enhancing rim (4) and a necrotic core (1). Each
    sequence brightens a different label, so channels can be told apart after z-scoring."""
    rng = np.random.default_rng(seed)
    grid = np.indices(SHAPE, dtype=float)
    size = np.array(SHAPE, dtype=float)[:, None, None, None]
    brain = (((grid - size / 2) / (size * 0.38)) ** 2).sum(0) <= 1
    centre = np.array([0.58, 0.55, 0.5])[:, None, None, None] * size
    distance = np.sqrt(((grid - centre) ** 2).sum(0))
    label = np.zeros(SHAPE, np.uint8)
    label[distance < 7] = 2
    label[distance < 4] = 4
    label[distance < 2.5] = 1
    label[~brain] = 0
    images = {m: 100.0 * (k + 1) + 10 * rng.standard_normal(SHAPE) for k, m in enumerate(MODALITIES)}
    images["flair"][label == 2] += 80
    images["t1"][label > 0] -= 30
    images["t1ce"][label == 4] += 120
    images["t2"][label == 1] += 90
    for image in images.values():
        image[~brain] = 0
    return {m: v.astype(np.float32) for m, v in images.items()}, label


def regions(label: np.ndarray) -> np.ndarray:
    """[TC, WT, ET] of a BraTS 2021 label map."""
    return np.stack([(label == 1) | (label == 4), label > 0, label == 4])


def write_per_sequence(root: Path, layout: str = "brats2021", affine=LPS_1MM, label=None):
    """A case of ``layout``; ``label`` (written as is) replaces the phantom's label map."""
    images, reference = phantom()
    case_id = "case001"
    folder = root / case_id
    folder.mkdir(parents=True)
    spec = LAYOUTS[layout]
    for m in MODALITIES:
        nib.save(nib.Nifti1Image(images[m], affine), folder / spec.file_name(case_id, m))
    label = to_scheme(reference, spec.label_scheme) if label is None else label
    nib.save(nib.Nifti1Image(label, affine), folder / spec.file_name(case_id, "seg"))
    (case,) = discover(root, layout).cases
    return case, reference


def write_msd(root: Path, affine=LPS_1MM):
    images, label = phantom()
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    stacked = np.stack([images[MSD_CANONICAL[n.lower()]] for n in MSD_NAMES], axis=-1)
    nib.save(nib.Nifti1Image(stacked, affine), root / "imagesTr" / "BRATS_001.nii.gz")
    nib.save(nib.Nifti1Image(to_scheme(label, "msd"), affine), root / "labelsTr" / "BRATS_001.nii.gz")
    manifest = {
        "modality": {str(i): n for i, n in enumerate(MSD_NAMES)},
        "training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}],
    }
    (root / "dataset.json").write_text(json.dumps(manifest))
    (case,) = discover(root).cases
    return case, label


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cases")
    cases = {layout: write_per_sequence(root / layout, layout)[0] for layout in ("brats2021", "brats2023")}
    cases["msd"] = write_msd(root / "msd")[0]
    cases["aniso"] = write_per_sequence(root / "aniso", affine=LPI_ANISO)[0]
    return cases


@pytest.fixture(scope="module")
def reference_label():
    return phantom()[1]


def run_val(case, **cfg):
    return val_transforms(PreprocessConfig(**cfg))(case_to_dict(case))


def train_patches(case, seed: int = 0, **cfg):
    chain = train_transforms(PreprocessConfig(**{**SMALL, **cfg}))
    chain.set_random_state(seed)
    return chain(case_to_dict(case))


# --------------------------------------------------------------------------- configuration
def test_config_round_trips_through_json_and_rejects_bad_values():
    cfg = PreprocessConfig(spacing=(1, 1, 2), patch_size=[96, 96, 64], noise=0.3)
    assert PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.spacing == (1.0, 1.0, 2.0) and cfg.patch_size == (96, 96, 64)
    assert PreprocessConfig(orientation="lps").orientation == "LPS"
    for bad in ({"orientation": "RAR"}, {"patch_size": (0, 64, 64)}, {"flip_prob": 1.5},
                {"normalization": "minmax"}, {"num_samples": 0}, {"spacing": (1, 1)}):
        with pytest.raises(ConfigurationError):
            PreprocessConfig(**bad)
    with pytest.raises(ConfigurationError, match="unknown"):
        PreprocessConfig.from_dict({"patch": 3})


def test_case_to_dict_carries_what_the_chains_need(data):
    d = case_to_dict(data["msd"])
    assert isinstance(d["image"], str) and d["scheme"] == "msd"
    assert [MSD_NAMES[c].lower() for c in d["channels"]] == ["flair", "t1w", "t1gd", "t2w"]
    d = case_to_dict(data["brats2023"])
    assert [Path(p).name for p in d["image"]] == [f"case001-{s}.nii.gz" for s in ("t2f", "t1n", "t1c", "t2w")]
    assert d["channels"] == [0, 1, 2, 3] and d["case_id"] == "case001" and d["label"].endswith("-seg.nii.gz")


# --------------------------------------------------------------------------- training chain
def test_training_chain_draws_num_samples_patches_of_the_patch_size(data):
    patches = train_patches(data["brats2021"])
    assert len(patches) == SMALL["num_samples"]
    for p in patches:
        assert p["image"].shape == (4, *SMALL["patch_size"]) and p["image"].dtype == torch.float32
        assert p["label"].shape == (3, *SMALL["patch_size"]) and p["label"].dtype == torch.float32
        assert set(torch.unique(p["label"]).tolist()) <= {0.0, 1.0}


def test_patches_oversample_tumour(data):
    def with_tumour(pos_fraction):
        patches = [p for seed in range(3) for p in train_patches(
            data["brats2021"], seed, pos_fraction=pos_fraction, num_samples=8, patch_size=(8, 8, 8))]
        return np.mean([p["label"][1].any().item() for p in patches])

    assert with_tumour(1.0) == 1.0
    assert with_tumour(0.0) < 0.5


def test_torchio_artefacts_change_the_image_only(data):
    plain = train_patches(data["brats2021"], flip_prob=0, intensity_prob=0)
    for artefact in ("bias_field", "ghosting", "motion", "noise"):
        torch.manual_seed(0)
        altered = train_patches(data["brats2021"], flip_prob=0, intensity_prob=0, **{artefact: 1.0})
        for a, b in zip(plain, altered):
            assert type(b["image"]) is torch.Tensor and b["image"].shape == a["image"].shape
            assert torch.equal(a["label"], b["label"])
            assert not torch.allclose(a["image"], b["image"], atol=1e-3), artefact


# --------------------------------------------------------------------------- validation chain
def test_validation_chain_keeps_the_whole_cropped_volume_z_scored(data):
    out = run_val(data["brats2021"])
    images, _ = phantom()
    nonzero = np.nonzero(np.any([images[m] != 0 for m in MODALITIES], axis=0))
    box = tuple(int(i.max() - i.min() + 1) for i in nonzero)
    assert out["image"].shape == (4, *box) and out["label"].shape == (3, *box)
    assert np.allclose(out["image"].affine[:3, :3].numpy(), np.eye(3))  # RAS, 1 mm
    for channel in out["image"]:
        values = channel[channel != 0]
        assert abs(values.mean().item()) < 1e-4
        assert values.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)


def test_msd_channels_come_out_in_canonical_order(data):
    msd, per_sequence = run_val(data["msd"]), run_val(data["brats2021"])
    assert torch.allclose(msd["image"], per_sequence["image"]) and torch.equal(msd["label"], per_sequence["label"])
    image, (tc, wt, et) = msd["image"], msd["label"].bool()
    brightest = {name: int(image[:, mask].mean(1).argmax()) for name, mask in
                 (("oedema", wt & ~tc), ("enhancing", et), ("necrosis", tc & ~et))}
    assert brightest == {"oedema": MODALITIES.index("flair"), "enhancing": MODALITIES.index("t1ce"),
                         "necrosis": MODALITIES.index("t2")}


@pytest.mark.parametrize("layout", ["brats2021", "brats2023", "msd"])
def test_each_label_scheme_maps_to_the_right_regions(data, reference_label, layout):
    source = nib.load(data[layout].label).get_fdata().astype(int)
    regions_out = run_val(data[layout])["label"].numpy().astype(bool)
    combos = {tuple(c) for c in regions_out.reshape(3, -1).T.tolist()}
    assert combos == {(0, 0, 0), (1, 1, 1), (1, 1, 0), (0, 1, 0)}
    # (TC, WT, ET) of each source value: count the voxels of each combination
    expected = {"brats2021": {4: (1, 1, 1), 1: (1, 1, 0), 2: (0, 1, 0)},
                "brats2023": {3: (1, 1, 1), 1: (1, 1, 0), 2: (0, 1, 0)},
                "msd": {3: (1, 1, 1), 2: (1, 1, 0), 1: (0, 1, 0)}}[layout]
    flat = regions_out.reshape(3, -1).T
    for value, combo in expected.items():
        assert (flat == np.array(combo, bool)).all(1).sum() == (source == value).sum() > 0


def test_label_values_outside_the_scheme_name_the_file(tmp_path):
    _, label = phantom()
    label[label == 4] = 3  # BraTS 2023 numbering in a BraTS 2021 layout
    case, _ = write_per_sequence(tmp_path, label=label)
    with pytest.raises(BadInputFile, match=r"case001_seg\.nii\.gz: label value\(s\) 3 not in the brats2021 scheme"):
        run_val(case)
    with pytest.raises(BadInputFile, match=r"case001_seg\.nii\.gz"):
        make_dataset([case], val_transforms(PreprocessConfig()), num_workers=1)


# --------------------------------------------------------------------------- inference chain
def inverted(case, nearest: bool):
    """The validation chain's regions, taken as a prediction on the inference chain's grid
    and inverted back to the input's grid."""
    chain = inference_transforms(PreprocessConfig())
    data = chain({k: v for k, v in case_to_dict(case).items() if k != "label"})
    data["pred"] = run_val(case)["label"]
    assert data["pred"].shape[1:] == data["image"].shape[1:]
    return invert_prediction(data, chain, nearest=nearest)


@pytest.mark.parametrize("layout", ["brats2021", "msd"])
def test_inversion_restores_grid_and_affine_exactly_at_1mm(data, reference_label, layout):
    pred = inverted(data[layout], nearest=True)
    assert pred.shape == (3, *SHAPE)
    assert np.allclose(pred.affine.numpy(), LPS_1MM)
    assert np.array_equal(pred.numpy().astype(bool), regions(reference_label))


@pytest.mark.parametrize("nearest", [True, False])
def test_inversion_undoes_resampling_and_reorientation(data, reference_label, nearest):
    source = nib.load(data["aniso"].images[0])
    pred = inverted(data["aniso"], nearest=nearest)
    assert pred.shape == (3, *SHAPE) and np.allclose(pred.affine.numpy(), source.affine)
    assert np.allclose(pred.affine.numpy(), LPI_ANISO)
    truth = regions(reference_label)
    mask = pred.numpy() > 0.5
    dice = 2 * (mask & truth).sum((1, 2, 3)) / (mask.sum((1, 2, 3)) + truth.sum((1, 2, 3)))
    assert (dice > 0.85).all(), dice


# --------------------------------------------------------------------------- data sets
def test_cached_prefix_holds_every_deterministic_step():
    chain = train_transforms(PreprocessConfig(**SMALL))
    first_random = chain.get_index_of_first(lambda t: isinstance(t, RandomizableTrait))
    normalise = chain.get_index_of_first(lambda t: isinstance(t, NormalizeIntensityd))
    assert normalise < first_random
    assert all(isinstance(t, RandomizableTrait) for t in chain.transforms[first_random:-1])


def test_memory_cache_serves_patches_and_stays_intact(data):
    chain = train_transforms(PreprocessConfig(**SMALL, intensity_prob=1.0))
    dataset = make_dataset([data["brats2021"], data["msd"]], chain, num_workers=1)
    assert isinstance(dataset, CacheDataset)
    before = [{k: (v.clone(), len(getattr(v, "applied_operations", ()))) for k, v in item.items()
               if isinstance(v, torch.Tensor)} for item in dataset._cache]
    loader = make_loader(dataset, batch_size=2)
    for _ in range(3):
        batches = list(loader)
    assert len(batches) == 1
    assert batches[0]["image"].shape == (8, 4, *SMALL["patch_size"])
    assert batches[0]["label"].shape == (8, 3, *SMALL["patch_size"])
    for item, saved in zip(dataset._cache, before):
        for key, (value, operations) in saved.items():
            assert torch.equal(item[key], value) and len(getattr(item[key], "applied_operations", ())) == operations


def test_disk_and_no_cache_give_the_same_preprocessing(data, tmp_path):
    chain = val_transforms(PreprocessConfig())
    memory = make_dataset([data["msd"]], chain, num_workers=1)[0]
    disk = make_dataset([data["msd"]], chain, cache="disk", cache_dir=tmp_path / "cache")
    plain = make_dataset([data["msd"]], chain, cache="none")
    assert isinstance(disk, PersistentDataset) and type(plain) is Dataset
    for other in (disk[0], disk[0], plain[0]):
        assert torch.equal(torch.as_tensor(other["image"]), torch.as_tensor(memory["image"]))
        assert torch.equal(torch.as_tensor(other["label"]), torch.as_tensor(memory["label"]))
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    make_dataset([data["msd"]], val_transforms(PreprocessConfig(spacing=(2, 2, 2))), cache="disk",
                 cache_dir=tmp_path / "cache")[0]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # another configuration, another entry


def test_make_dataset_rejects_bad_cache_settings(data):
    with pytest.raises(ConfigurationError, match="cache_dir"):
        make_dataset([data["msd"]], val_transforms(PreprocessConfig()), cache="disk")
    with pytest.raises(ConfigurationError, match="unknown cache"):
        make_dataset([data["msd"]], val_transforms(PreprocessConfig()), cache="ram")


# --------------------------------------------------------------------------- benchmark
def test_throughput_benchmark_runs_and_writes_json(tmp_path):
    import importlib.util

    path = Path(__file__).parents[1] / "bench" / "data_throughput.py"
    spec = importlib.util.spec_from_file_location("data_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "throughput.json"
    assert bench.main(["--cases", "1", "--size", "48,48,40", "--patches", "32", "--workers", "0",
                       "--epochs", "1", "--steps", "1", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["patch"] == 32 and row["loader_patches_per_s"] > 0 and row["ratio"] > 0


def test_threads_sharing_one_loader_read_every_case_whole(tmp_path):
    """MONAI's NibabelReader keeps the names of its last read on the instance; the threads
    that fill a memory cache share it, and a one-file label read in between made a case
    one channel. The pipelines' reader keeps them per thread."""
    import pickle
    from multiprocessing.pool import ThreadPool

    from monai.transforms import LoadImaged

    from brats_cggm.data.phantom import write_phantoms
    from brats_cggm.data.transforms import ThreadSafeNibabelReader, case_to_dict

    write_phantoms(tmp_path, 6, size=16, layout="brats2021", seed=3)
    cases = [case_to_dict(c) for c in discover(tmp_path).cases] * 4
    load = LoadImaged(["image", "label"], reader=ThreadSafeNibabelReader(), image_only=True)
    with ThreadPool(4) as pool:
        shapes = pool.map(lambda d: (tuple(load(d)["image"].shape), tuple(load(d)["label"].shape)), cases)
    assert all(image == (4, 16, 16, 16) and label == (16, 16, 16) for image, label in shapes), shapes
    copy = pickle.loads(pickle.dumps(load))  # data-loader workers get a copy
    assert tuple(copy(cases[0])["image"].shape) == (4, 16, 16, 16)
