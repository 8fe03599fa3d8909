"""The card's clean-up (postprocessing.py) on hand-made label maps with known answers, the
numpy connected components (components.py) against SciPy's, and the section's checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from brats_cggm import models
from brats_cggm.errors import BadInputFile, ConfigurationError, IncompatibleModel
from brats_cggm.inference.card import check_card
from brats_cggm.inference.components import label_components
from brats_cggm.inference.postprocessing import Postprocessing, choose_postprocessing, tumour_box

MM1 = np.eye(4)  # 1 mm voxels: 1000 voxels = 1 ml


def box(labels: np.ndarray, corner: tuple[int, int, int], size: int, value: int) -> None:
    labels[tuple(slice(c, c + size) for c in corner)] = value


@pytest.mark.parametrize("connectivity", [6, 26])
@pytest.mark.parametrize("density", [0.1, 0.3, 0.55])
def test_components_are_scipys(connectivity, density):
    ndimage = pytest.importorskip("scipy.ndimage")
    mask = np.random.default_rng(int(density * 100) + connectivity).random((23, 19, 27)) < density
    labels, sizes = label_components(mask, connectivity)
    expected, _ = ndimage.label(mask, ndimage.generate_binary_structure(3, 1 if connectivity == 6 else 3))
    assert np.array_equal(labels, expected)
    assert np.array_equal(sizes, np.bincount(expected.ravel())[1:])


def test_diagonal_neighbours_join_only_with_26_connectivity():
    mask = np.zeros((4, 4, 4), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[1, 1, 2] = True
    assert label_components(mask, 6)[1].tolist() == [1, 2]
    assert label_components(mask, 26)[1].tolist() == [3]
    assert label_components(np.zeros((3, 3, 3), bool))[1].size == 0


def tumour_with_islands() -> np.ndarray:
    """A 20^3 tumour (oedema round an enhancing rim round necrosis) in a 1 mm 80^3 grid, a
    5^3 oedema island 10 mm from it, a 3^3 one 40 mm away and a 2^3 enhancing island inside
    the oedema, apart from the main enhancing tumour."""
    labels = np.zeros((80, 80, 80), dtype=np.uint8)
    box(labels, (10, 10, 10), 20, 2)
    box(labels, (14, 14, 14), 8, 4)
    box(labels, (16, 16, 16), 4, 1)
    box(labels, (11, 11, 25), 2, 4)
    box(labels, (10, 10, 40), 5, 2)   # 11 voxels beyond the tumour's last slice (29): 11 mm
    box(labels, (60, 60, 60), 3, 2)   # far
    return labels


def test_small_and_far_whole_tumour_islands_become_background():
    labels = tumour_with_islands()
    small = Postprocessing.from_dict({"WT": {"min_ml": 0.05}})(labels, MM1)
    assert (small[0][60:, 60:, 60:] == 0).all() and (small[0][10:15, 10:15, 40:45] == 2).all()
    assert small[1]["removed_voxels"] == {"WT": 27, "TC": 0, "ET": 0}
    near = Postprocessing.from_dict({"WT": {"max_distance_mm": 11.0}})(labels, MM1)[0]
    assert (near[10:15, 10:15, 40:45] == 2).all() and (near[60:, 60:, 60:] == 0).all()
    tight = Postprocessing.from_dict({"WT": {"max_distance_mm": 10.9}})(labels, MM1)[0]
    assert (tight[10:15, 10:15, 40:45] == 0).all()
    fraction = Postprocessing.from_dict({"WT": {"min_fraction_of_largest": 0.02}})(labels, MM1)
    assert fraction[1]["removed_voxels"]["WT"] == 27 + 125  # both under 2 % of 8000
    assert np.array_equal(fraction[0][:35, :35, :35], labels[:35, :35, :35])


def test_small_enhancing_and_core_islands_are_relabelled_within_the_tumour():
    labels = tumour_with_islands()
    cleaned, applied = Postprocessing.from_dict({"ET": {"min_ml": 0.01}})(labels, MM1)
    assert (cleaned[11:13, 11:13, 25:27] == 1).all(), "an enhancing island becomes necrosis"
    assert applied["removed_voxels"] == {"WT": 0, "TC": 0, "ET": 8}
    cleaned, applied = Postprocessing.from_dict({"TC": {"min_ml": 0.01}})(labels, MM1)
    assert (cleaned[11:13, 11:13, 25:27] == 2).all(), "a core island becomes oedema"
    assert applied["removed_voxels"] == {"WT": 0, "TC": 8, "ET": 8}
    assert np.array_equal(cleaned[14:22, 14:22, 14:22], labels[14:22, 14:22, 14:22])


def test_the_small_enhancement_relabel():
    labels = tumour_with_islands()
    et = int((labels == 4).sum())
    kept, applied = Postprocessing.from_dict({"small_et_ml": et / 1000})(labels, MM1)
    assert np.array_equal(kept, labels) and not applied["small_et_relabelled"]
    relabelled, applied = Postprocessing.from_dict({"small_et_ml": et / 1000 + 0.001})(labels, MM1)
    assert applied["small_et_relabelled"] and not (relabelled == 4).any()
    assert np.array_equal(relabelled > 0, labels > 0) and applied["removed_voxels"] == {"WT": 0, "TC": 0, "ET": et}


def test_voxel_size_sets_millilitres_and_millimetres():
    labels = tumour_with_islands()
    coarse = np.diag([2.0, 2.0, 2.0, 1.0])  # 8 times the volume, twice the distance
    assert Postprocessing.from_dict({"WT": {"min_ml": 0.9}})(labels, coarse)[1]["removed_voxels"]["WT"] == 27
    assert Postprocessing.from_dict({"WT": {"max_distance_mm": 21}})(labels, coarse)[1]["removed_voxels"]["WT"] == 152


def test_an_empty_map_and_the_tumours_box():
    empty = np.zeros((5, 6, 7), dtype=np.uint8)
    cleaned, applied = Postprocessing.from_dict({"WT": {"min_ml": 1}, "small_et_ml": 1})(empty, MM1)
    assert not cleaned.any() and applied["removed_voxels"] == {"WT": 0, "TC": 0, "ET": 0}
    empty[1, 2:4, 6] = 2
    assert tumour_box(empty) == (slice(1, 2), slice(2, 4), slice(6, 7))


@pytest.mark.parametrize("section,message", [
    ([], "must be a JSON object"),
    ({"wt": {}}, "unknown key"),
    ({"connectivity": 8}, "connectivity must be 6 or 26"),
    ({"WT": {"min_ml": -1}}, r"WT\.min_ml must be a number > 0"),
    ({"ET": {"radius": 3}}, "ET must be an object of"),
    ({"WT": {"min_fraction_of_largest": 2}}, "<= 1"),
    ({"small_et_ml": "x"}, "small_et_ml must be a number"),
])
def test_bad_sections_are_refused_in_one_line(section, message):
    with pytest.raises(ConfigurationError, match=message):
        Postprocessing.from_dict(section)
    card = {**json.loads(models.default().path.with_suffix(".card.json").read_text()), "postprocessing": section}
    with pytest.raises(IncompatibleModel, match=f"model.onnx: the card's postprocessing.*{message}") as error:
        check_card(card, "model.onnx")
    assert "\n" not in str(error.value)


def test_the_choice_card_off_or_a_file(tmp_path):
    card = {"postprocessing": {"ET": {"min_ml": 0.1}}}
    assert choose_postprocessing({}) is None and choose_postprocessing(card, "off") is None
    assert choose_postprocessing(card).to_dict() == {"connectivity": 26, "ET": {"min_ml": 0.1}}
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"WT": {"min_ml": 2}, "connectivity": 6}))
    assert choose_postprocessing({}, rules) == Postprocessing(6, {"WT": {"min_ml": 2.0}})
    rules.write_text(json.dumps({"WT": {"min_ml": 0}}))
    with pytest.raises(BadInputFile, match=r"rules\.json: postprocessing\.WT\.min_ml"):
        choose_postprocessing({}, rules)
    with pytest.raises(BadInputFile, match="postprocessing file is missing"):
        choose_postprocessing({}, tmp_path / "none.json")


def test_the_rules_in_a_few_words():
    rules = Postprocessing.from_dict({"WT": {"min_ml": 0.5, "max_distance_mm": 20}, "small_et_ml": 0.25})
    assert rules.describe() == "WT min_ml 0.5, max_distance_mm 20; ET under 0.25 ml in all -> necrosis"
    assert Postprocessing.from_dict({}).describe() == "no rule"
