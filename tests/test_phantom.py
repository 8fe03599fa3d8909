"""The phantom generator: geometry, labels, sequence contrasts and the files of each layout."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from brats_cggm import MODALITIES
from brats_cggm.data.labels import SCHEMES, to_brats2021
from brats_cggm.data.layouts import LAYOUTS, discover
from brats_cggm.data.phantom import (
    CALIBRATION,
    TISSUE_CODES,
    case_seed,
    generate_case,
    grid_size,
    write_phantoms,
)
from brats_cggm.errors import ConfigurationError

SMALL = (64, 64, 64)
MEDIUM = (96, 128, 80)
TINY = (48, 48, 40)
FILES = (40, 40, 32)  # every new grid spacing costs ~0.5 s once (blurring the template)
CONTRAST_SEEDS = (0, 1, 2)
CALIBRATION_SEEDS = range(12)  # CONTRAST_SEEDS first
BENCH = Path(__file__).resolve().parents[1] / "bench" / "phantom_vs_real.py"


@pytest.fixture(scope="module")
def small():
    return generate_case(11, SMALL)


@pytest.fixture(scope="module")
def medium_cases():
    return [generate_case(seed, MEDIUM) for seed in CONTRAST_SEEDS]


def relative_means(case) -> dict[str, dict[str, float]]:
    """Mean intensity per tissue and tumour class, over normal white matter, per sequence."""
    normal = case.label == 0
    regions = {
        "wm": normal & (case.tissue == TISSUE_CODES["wm"]),
        "gm": normal & (case.tissue == TISSUE_CODES["gm"]),
        "csf": normal & (case.tissue == TISSUE_CODES["csf"]),
        "ncr": case.label == 1,
        "ed": case.label == 2,
        "et": case.label == 4,
    }
    return {
        m: {
            name: float(image[mask].mean() / image[regions["wm"]].mean())
            for name, mask in regions.items()
            if mask.any()
        }
        for m, image in case.images.items()
    }


# --- the arrays ---------------------------------------------------------------------------


def test_same_seed_same_case_other_seed_other_case(small):
    again = generate_case(11, SMALL)
    for m in MODALITIES:
        np.testing.assert_array_equal(small.images[m], again.images[m])
    np.testing.assert_array_equal(small.label, again.label)
    np.testing.assert_array_equal(small.affine, again.affine)
    other = generate_case(12, SMALL)
    assert not np.array_equal(small.label, other.label)
    assert not np.array_equal(small.images["t1"], other.images["t1"])
    assert not np.allclose(small.affine, other.affine)


def test_arrays_look_like_skull_stripped_brats(small):
    assert set(small.images) == set(MODALITIES)
    brain = small.tissue > 0
    assert 0.1 < brain.mean() < 0.25  # a BraTS brain fills 0.12-0.19 of the field of view
    for image in small.images.values():
        assert image.shape == SMALL and image.dtype == np.float32
        assert image.min() == 0 and np.all(image[~brain] == 0)
        assert (image[brain] > 0).mean() > 0.99
        assert np.array_equal(image, np.round(image)) and image.max() <= 32767
    assert small.label.dtype == np.uint8 and set(np.unique(small.label)) <= {0, 1, 2, 4}
    assert np.all(small.label[~brain] == 0)


@pytest.mark.parametrize("size", [SMALL, MEDIUM, TINY])
def test_any_grid_covers_brats_field_of_view(size):
    case = generate_case(3, size)
    assert case.label.shape == size and all(image.shape == size for image in case.images.values())
    np.testing.assert_allclose(case.spacing, np.array([240, 240, 155]) / size)
    # BraTS orientation: array axes along -x, -y, +z of RAS, never the identity
    np.testing.assert_array_equal(np.sign(np.diag(case.affine)[:3]), [-1, -1, 1])
    assert np.count_nonzero(case.affine[:3, :3] - np.diag(np.diag(case.affine[:3, :3]))) == 0
    # the field of view's centre (voxel-corner convention) sits near BraTS's (-119.5, 119.5, 77)
    centre = case.affine @ np.array([*((np.array(size) - 1) / 2), 1])
    np.testing.assert_allclose(centre[:3], [-119.5, 119.5, 77.0], atol=4.5)
    assert nib.aff2axcodes(case.affine) == ("L", "P", "S")


def test_one_seed_gives_the_same_brain_and_tumour_at_every_size(small):
    coarse, fine = generate_case(11, MEDIUM), small
    for label in (1, 2, 4):
        volumes = [(c.label == label).sum() * np.prod(c.spacing) for c in (coarse, fine)]
        assert volumes[0] == pytest.approx(volumes[1], rel=0.35, abs=1500)
    brain = [(c.tissue > 0).sum() * np.prod(c.spacing) for c in (coarse, fine)]
    assert brain[0] == pytest.approx(brain[1], rel=0.05)
    # the same field of view: first voxel centres differ by half the difference in spacing
    shift = np.diag([-1, -1, 1]) @ (np.array(coarse.spacing) - fine.spacing) / 2
    np.testing.assert_allclose(coarse.affine[:3, 3] - fine.affine[:3, 3], shift, atol=1e-9)


def test_cases_differ_in_position_size_and_tumour(medium_cases):
    centres = [np.argwhere(c.tissue > 0).mean(0) for c in medium_cases]
    volumes = [(c.tissue > 0).sum() for c in medium_cases]
    tumours = [np.argwhere(c.label > 0).mean(0) for c in medium_cases]
    assert min(np.linalg.norm(a - b) for i, a in enumerate(centres) for b in centres[i + 1 :]) > 0.5
    assert len(set(volumes)) == len(volumes)
    assert min(np.linalg.norm(a - b) for i, a in enumerate(tumours) for b in tumours[i + 1 :]) > 3


@pytest.mark.parametrize(
    "bad", [0, 8, (64, 64), (64, 64, 64, 4), (64.5, 64, 64), 1000, None, "", "64x64", "64xx", "a"]
)
def test_bad_sizes_are_configuration_errors(bad):
    with pytest.raises(ConfigurationError, match="size"):
        grid_size(bad)


def test_grid_size_accepts_one_number_as_a_cube():
    assert grid_size(64).tolist() == [64, 64, 64] and grid_size([80]).tolist() == [80, 80, 80]
    assert grid_size((96, 128, 80)).tolist() == [96, 128, 80]
    for text in ("96x128x80", "96 128 80", "96,128,80"):
        assert grid_size(text).tolist() == [96, 128, 80]
    assert grid_size("64").tolist() == [64, 64, 64]


# --- tumours ------------------------------------------------------------------------------


def test_tumours_are_nested_and_vary():
    """Necrosis inside an enhancing rim inside oedema; most cases have all three classes,
    a few no enhancing tumour; some have two lesions. As in real BraTS, the oedema borders
    much of the core but not all of it (about two thirds at 1 mm, less on this coarse grid)."""
    present, lesions, enclosed_core, enclosed_necrosis = [], [], [], []
    for seed in range(16):
        case = generate_case(100 + seed, TINY)
        label = case.label
        present.append({v for v in (1, 2, 4) if (label == v).any()})
        lesions.append(ndimage.label(label > 0)[1])
        core = (label == 1) | (label == 4)
        # the whole tumour wraps much of the core: part of its outer shell is oedema
        shell = ndimage.binary_dilation(core) & ~core
        enclosed_core.append((label[shell] > 0).mean())
        if (label == 1).any() and (label == 4).any():
            shell = ndimage.binary_dilation(label == 1) & (label != 1)
            enclosed_necrosis.append((label[shell] == 4).mean())
    assert sum(p == {1, 2, 4} for p in present) >= 10
    assert all(2 in p for p in present)
    assert max(lesions) >= 2 and min(lesions) >= 1
    assert 0.3 < np.median(enclosed_core) < 0.9
    assert np.median(enclosed_necrosis) > 0.8


# --- sequence contrasts --------------------------------------------------------------------


@pytest.mark.parametrize("seed_index", range(len(CONTRAST_SEEDS)))
def test_every_sequence_has_its_own_contrast(medium_cases, seed_index):
    """Each sequence shows the tissues as real BraTS scans do (calibrated on them: milder
    than textbook contrasts, and FLAIR barely tells grey from white matter)."""
    means = relative_means(medium_cases[seed_index])
    flair, t1, t1ce, t2 = (means[m] for m in MODALITIES)
    # normal tissue: T1 WM > GM > CSF; T2 CSF > GM > WM; FLAIR GM ~ WM > CSF (CSF dark)
    assert t1["csf"] < t1["gm"] < 1 and t1ce["csf"] < t1ce["gm"] < 1
    assert t2["csf"] > t2["gm"] > 1 and t2["csf"] > 1.6
    assert abs(flair["gm"] - 1) < 0.15 and flair["csf"] < min(0.75, flair["gm"] - 0.2)
    # oedema bright on FLAIR and T2, dark-ish on T1
    assert flair["ed"] > 1.3 and t2["ed"] > 1.3 and t1["ed"] < 0.95
    if "et" in t1:
        # enhancement only on T1ce
        assert t1ce["et"] > 1 and t1ce["et"] > t1["et"] + 0.15
        assert abs(t1ce["ed"] - t1["ed"]) < 0.15
    if "ncr" in t1:
        # necrosis (with non-enhancing tumour, as BraTS labels it) dark on T1 and T1ce,
        # bright on FLAIR and T2
        assert t1["ncr"] < 0.85 and flair["ncr"] > 1.2 and t2["ncr"] > 1.3
        if "et" in t1:
            assert t1ce["ncr"] < t1ce["et"] - 0.2


@pytest.fixture(scope="module")
def bench():
    """bench/phantom_vs_real.py as a module, to measure phantoms as it measures real cases."""
    spec = importlib.util.spec_from_file_location("phantom_vs_real", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def calibration_measures(medium_cases, bench):
    more = [generate_case(seed, MEDIUM) for seed in CALIBRATION_SEEDS if seed not in CONTRAST_SEEDS]
    return [bench.measure_case(c.images, c.label, c.spacing) for c in (*medium_cases, *more)]


def test_contrasts_land_on_their_calibration_targets(calibration_measures):
    """The key contrasts, in standard deviations of each sequence's brain, sit near the real
    BraTS means the generator is calibrated to (CALIBRATION) and vary from case to case as
    real ones do (sd about 0.7). Before the calibration: 5.0, 2.7 and 4.9, sd 0.2-0.5."""
    for key, target in CALIBRATION.items():
        values = np.array([measures[f"gap/{key}"] for measures in calibration_measures])
        values = values[np.isfinite(values)]  # a case without ET has no ET gap
        assert len(values) >= 10
        assert abs(values.mean() - target) < 0.4, (key, values.mean())
        assert 0.35 < values.std(ddof=1) < 1.1, (key, values.std(ddof=1))


def test_sequences_have_their_own_scale_noise_and_bias(medium_cases):
    wm_levels = []
    for case in medium_cases:
        wm = (case.label == 0) & (case.tissue == TISSUE_CODES["wm"])
        wm_levels.append([case.images[m][wm].mean() for m in MODALITIES])
        spread = [case.images[m][wm].std() / case.images[m][wm].mean() for m in MODALITIES]
        assert all(0.02 < s < 0.4 for s in spread)
    levels = np.array(wm_levels)
    assert len(np.unique(np.round(levels))) == levels.size  # per-case, per-sequence scale


# --- files --------------------------------------------------------------------------------


def read(path):
    image = nib.load(path)
    return image, np.asarray(image.dataobj)


@pytest.mark.parametrize("layout", ["brats2021", "brats2023"])
def test_per_sequence_layouts_are_real_brats_files(tmp_path, layout):
    calls = []
    folders = write_phantoms(
        tmp_path, 2, size=FILES, layout=layout, seed=5, progress=lambda *a: calls.append(a)
    )
    assert calls == [(1, 2), (2, 2)]
    ids = (
        ["BraTS2021_00000", "BraTS2021_00001"]
        if layout == "brats2021"
        else ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000"]
    )
    assert [f.name for f in folders] == ids
    spec, scheme = LAYOUTS[layout], SCHEMES[LAYOUTS[layout].label_scheme]
    expected = generate_case(case_seed(5, 1), FILES)
    names = {spec.file_name(ids[1], part) for part in (*MODALITIES, "seg")}
    assert {p.name for p in folders[1].iterdir()} == names  # no temporary files left
    for modality in MODALITIES:
        image, data = read(folders[1] / spec.file_name(ids[1], modality))
        assert image.get_data_dtype() == np.int16 and data.shape == FILES
        np.testing.assert_array_equal(data, expected.images[modality])
        np.testing.assert_allclose(image.affine, expected.affine, atol=1e-5)
        assert image.header.get_xyzt_units()[0] == "mm"
        assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
    image, label = read(folders[1] / spec.file_name(ids[1], "seg"))
    assert image.get_data_dtype() == np.uint8
    assert set(np.unique(label)) <= scheme.values
    back = to_brats2021(label, scheme.name)
    np.testing.assert_array_equal(back, expected.label)
    found = discover(tmp_path)
    assert found.layout == layout and [c.case_id for c in found.cases] == ids and not found.problems


def test_msd_layout_is_like_task01(tmp_path):
    images = write_phantoms(tmp_path, 2, size=FILES, layout="msd", seed=5)
    assert [p.relative_to(tmp_path).as_posix() for p in images] == [
        "imagesTr/BRATS_001.nii.gz",
        "imagesTr/BRATS_002.nii.gz",
    ]
    manifest = json.loads((tmp_path / "dataset.json").read_text())
    assert manifest["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert manifest["labels"]["1"] == "edema" and manifest["labels"]["3"] == "enhancing tumour"
    assert manifest["numTraining"] == 2 and manifest["test"] == []
    assert manifest["training"][1] == {
        "image": "./imagesTr/BRATS_002.nii.gz",
        "label": "./labelsTr/BRATS_002.nii.gz",
    }
    expected = generate_case(case_seed(5, 1), FILES)
    image, data = read(images[1])
    assert data.shape == (*FILES, 4) and image.get_data_dtype() == np.float32
    for channel, modality in enumerate(MODALITIES):
        np.testing.assert_array_equal(data[..., channel], expected.images[modality])
    _, label = read(tmp_path / "labelsTr" / "BRATS_002.nii.gz")
    for brats2021, msd in ((0, 0), (1, 2), (2, 1), (4, 3)):
        np.testing.assert_array_equal(label == msd, expected.label == brats2021)
    found = discover(tmp_path)
    assert found.layout == "msd" and [c.case_id for c in found.cases] == ["BRATS_001", "BRATS_002"]
    assert found.cases[0].channels == (0, 1, 2, 3)


def test_files_are_reproducible_byte_for_byte(tmp_path):
    first = write_phantoms(tmp_path / "a", 1, size=FILES, seed=9)[0]
    second = write_phantoms(tmp_path / "b", 1, size=FILES, seed=9)[0]
    for path in sorted(first.iterdir()):
        assert path.read_bytes() == (second / path.name).read_bytes()


def test_bad_requests_are_configuration_errors(tmp_path):
    with pytest.raises(ConfigurationError, match="layout"):
        write_phantoms(tmp_path, 1, size=32, layout="brats2019")
    with pytest.raises(ConfigurationError, match="at least 1"):
        write_phantoms(tmp_path, 0, size=32)
    assert not any(tmp_path.iterdir())


# --- the real size ------------------------------------------------------------------------


@pytest.mark.slow
def test_default_case_is_brats_sized_at_1_mm():
    case = generate_case(0)
    assert case.label.shape == (240, 240, 155)
    assert case.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(case.affine[:3, :3], np.diag([-1.0, -1.0, 1.0]))
    np.testing.assert_allclose(case.affine[:3, 3], [0, 239, 0], atol=4)
    means = relative_means(case)
    assert means["flair"]["csf"] < 0.75 and means["flair"]["ed"] > 1.3
    assert means["t2"]["csf"] > 1.6 and means["t1ce"]["et"] > 1.1 > means["t1"]["et"]


# --- the comparison with real scans ---------------------------------------------------------


def test_bench_measures_files_as_it_measures_memory(tmp_path):
    """bench/phantom_vs_real.py, with phantoms written to disk as its 'real' folder: read
    from files, the same cases measure exactly as generated in memory; both reports written."""
    write_phantoms(tmp_path / "cases", 2, size=FILES, seed=4)
    result = subprocess.run(
        [sys.executable, str(BENCH), "--cases", "2", "--size", "40x40x32", "--seed", "4",
         "--real", str(tmp_path / "cases"), "--out", str(tmp_path / "report")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "report.json").read_text())
    assert payload["summary"]["phantom"] == payload["summary"]["real"]
    assert list(payload["cases"]["real"]) == ["BraTS2021_00000", "BraTS2021_00001"]
    assert payload["summary"]["real"]["gap/ed_flair"]["n"] == 2
    report = (tmp_path / "report.md").read_text()
    assert "| ED on FLAIR |" in report and "| TC / WT |" in report


def test_bench_says_in_one_line_that_real_cases_are_missing(tmp_path):
    absent, out = tmp_path / "absent", tmp_path / "report"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--real", str(absent), "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "no labelled real cases" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing written
