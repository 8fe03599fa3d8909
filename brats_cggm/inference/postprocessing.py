"""Clean-up after the network, as the model card's ``postprocessing`` section says: rules on
the connected components of the final regions and the small-enhancement relabel that
BraTS entries use. A card without the section gets nothing applied.

The section (every key optional)::

    "postprocessing": {
      "connectivity": 26,                       # 6 or 26 (default)
      "WT": {"min_ml": 0.5, "max_distance_mm": 20, "min_fraction_of_largest": 0.1},
      "TC": {"min_ml": 0.1},
      "ET": {"min_ml": 0.05},
      "small_et_ml": 0.5                        # total ET under this -> relabelled necrosis
    }

In this order, on a BraTS 2021 label map (1 necrosis, 2 oedema, 4 enhancing): each
region's components that are smaller than ``min_ml``, or than ``min_fraction_of_largest``
of the region's largest component, or farther than ``max_distance_mm`` (closest voxels,
in mm) from the largest are removed: a whole-tumour island becomes background, a tumour
core island oedema, an enhancing island necrosis. Then, when the enhancing tumour left is
smaller than ``small_et_ml`` in all, it is relabelled necrosis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brats_cggm.errors import BadInputFile, ConfigurationError
from brats_cggm.inference.components import CONNECTIVITIES, bounding_box, label_components
from multimodal_general.io import read_json_object

#: region -> (its labels, the label its removed voxels take), in the order rules apply
REGION_RULES = {"WT": ((1, 2, 4), 0), "TC": ((1, 4), 2), "ET": ((4,), 1)}
RULE_KEYS = ("min_ml", "max_distance_mm", "min_fraction_of_largest")
#: how many voxel pairs a distance is measured over at once
DISTANCE_PAIRS = 1 << 16


@dataclass(frozen=True)
class Postprocessing:
    """The checked rules of a card's ``postprocessing`` section."""

    connectivity: int = 26
    #: region -> {rule key: value} (only regions with rules)
    regions: dict[str, dict[str, float]] = field(default_factory=dict)
    small_et_ml: float | None = None

    @classmethod
    def from_dict(cls, section: Any) -> Postprocessing:
        """The rules of ``section``; a :class:`ConfigurationError` naming the first bad key."""
        if not isinstance(section, dict):
            raise ConfigurationError("postprocessing must be a JSON object")
        unknown = sorted(set(section) - {"connectivity", "small_et_ml", *REGION_RULES})
        if unknown:
            raise ConfigurationError(f"postprocessing: unknown key(s) {', '.join(unknown)} "
                                     f"(known: connectivity, {', '.join(REGION_RULES)}, small_et_ml)")
        if section.get("connectivity", 26) not in CONNECTIVITIES:
            raise ConfigurationError(f"postprocessing.connectivity must be 6 or 26; got {section['connectivity']!r}")
        regions = {region: _rule(region, section[region]) for region in REGION_RULES if region in section}
        small = section.get("small_et_ml")
        if small is not None and not _positive(small):
            raise ConfigurationError(f"postprocessing.small_et_ml must be a number > 0; got {small!r}")
        return cls(int(section.get("connectivity", 26)), regions, None if small is None else float(small))

    def to_dict(self) -> dict[str, Any]:
        return {"connectivity": self.connectivity, **self.regions,
                **({"small_et_ml": self.small_et_ml} if self.small_et_ml is not None else {})}

    def describe(self) -> str:
        """The rules in a few words, e.g. ``WT min_ml 0.5, max_distance_mm 20; small ET < 0.5 ml -> necrosis``."""
        parts = [f"{region} " + ", ".join(f"{key} {value:g}" for key, value in rules.items())
                 for region, rules in self.regions.items()]
        if self.small_et_ml is not None:
            parts.append(f"ET under {self.small_et_ml:g} ml in all -> necrosis")
        return "; ".join(parts) or "no rule"

    def __call__(self, labels: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """``labels`` (BraTS 2021 numbering, on the grid ``affine``) cleaned, and what was
        applied: the rules and the voxels each region (TC, WT, ET) lost. Works in the
        tumour's bounding box (every rule keeps voxels inside it)."""
        spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
        voxel_ml = float(abs(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
        labels = labels.copy()
        box = labels[tumour_box(labels)]
        before = {region: int(np.isin(box, values).sum()) for region, (values, _) in REGION_RULES.items()}
        for region, rule in self.regions.items():
            values, replacement = REGION_RULES[region]
            mask = np.isin(box, values)
            box[mask & ~kept_components(mask, rule, spacing, voxel_ml, self.connectivity)] = replacement
        et = box == 4
        relabelled = self.small_et_ml is not None and 0 < et.sum() * voxel_ml < self.small_et_ml
        if relabelled:
            box[et] = 1
        removed = {region: before[region] - int(np.isin(box, values).sum())
                   for region, (values, _) in REGION_RULES.items()}
        return labels, {"rules": self.to_dict(), "removed_voxels": removed, "small_et_relabelled": bool(relabelled)}


def tumour_box(labels: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every labelled voxel (an empty box when there is none)."""
    return bounding_box(labels != 0) or (slice(0, 0),) * labels.ndim


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _rule(region: str, rule: Any) -> dict[str, float]:
    if not isinstance(rule, dict) or not rule or set(rule) - set(RULE_KEYS):
        raise ConfigurationError(f"postprocessing.{region} must be an object of {', '.join(RULE_KEYS)}; got {rule!r}")
    for key, value in rule.items():
        if not _positive(value) or (key == "min_fraction_of_largest" and value > 1):
            raise ConfigurationError(f"postprocessing.{region}.{key} must be a number > 0"
                                     f"{' and <= 1' if key == 'min_fraction_of_largest' else ''}; got {value!r}")
    return {key: float(value) for key, value in rule.items()}


def kept_components(mask: np.ndarray, rule: dict[str, float], spacing: np.ndarray, voxel_ml: float,
                    connectivity: int = 26) -> np.ndarray:
    """The voxels of ``mask`` in components that ``rule`` keeps (see the module's docstring)."""
    labels, sizes = label_components(mask, connectivity)
    if not sizes.size:
        return mask
    largest = int(np.argmax(sizes))
    keep = sizes * voxel_ml >= rule.get("min_ml", 0.0)
    keep &= sizes >= rule.get("min_fraction_of_largest", 0.0) * sizes[largest]
    keep[largest] = True
    if "max_distance_mm" in rule:
        points = component_points(labels, sizes, spacing)
        for k in np.flatnonzero(keep):
            keep[k] = k == largest or _distance_mm(points[largest], points[k]) <= rule["max_distance_mm"]
    return np.concatenate([[False], keep])[labels]


def component_points(labels: np.ndarray, sizes: np.ndarray, spacing: np.ndarray) -> list[np.ndarray]:
    """Each component's voxel centres in mm (``[size, 3]``), in label order."""
    where = np.flatnonzero(labels)
    order = np.argsort(labels.reshape(-1)[where], kind="stable")
    points = np.stack(np.unravel_index(where[order], labels.shape), axis=1) * spacing
    return np.split(points, np.cumsum(sizes)[:-1])


def _distance_mm(points_a: np.ndarray, points_b: np.ndarray) -> float:
    """The smallest distance between a point of ``points_a`` and one of ``points_b`` (mm).
    ``points_a`` are visited nearest to ``points_b``'s bounding box first (that distance is
    a lower bound), in chunks, until no point left can be nearer."""
    low, high = points_b.min(axis=0), points_b.max(axis=0)
    bound = np.linalg.norm(np.maximum(0.0, np.maximum(low - points_a, points_a - high)), axis=1)
    order = np.argsort(bound, kind="stable")
    chunk = max(1, DISTANCE_PAIRS // len(points_b))
    best = np.inf
    for first in range(0, len(order), chunk):
        if bound[order[first]] >= best:
            break
        part = points_a[order[first:first + chunk]]
        best = min(best, float(np.sqrt(((part[:, None, :] - points_b[None]) ** 2).sum(axis=2).min())))
    return best


#: ``--postprocessing``: the card's rules, none, or (any other value) a JSON file of rules
CHOICES = ("card", "off")


def choose_postprocessing(card: dict[str, Any], choice: str | Path = "card") -> Postprocessing | None:
    """The rules to apply: the card's section (none when it has none) for ``card``, none for
    ``off``, otherwise those of the JSON file ``choice`` (to measure rules before a card
    carries them)."""
    if str(choice) == "off":
        return None
    if str(choice) == "card":
        section = card.get("postprocessing")
        return None if section is None else Postprocessing.from_dict(section)
    path = Path(choice)
    try:
        return Postprocessing.from_dict(read_json_object(path, "postprocessing", BadInputFile))
    except ConfigurationError as error:
        raise BadInputFile(path, str(error)) from None
