"""What a segmentation of one case is: the label map, the regions' probabilities and the
sequences' contribution maps on the input's grid, and the case's summary (volumes,
sequences used, contribution shares) that its JSON holds. Both inference chains end in it."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import nibabel as nib
import numpy as np

from brats_cggm import MODALITIES
from brats_cggm.data.labels import REGIONS, SCHEMES, to_brats2021
from brats_cggm.inference.contributions import region_shares


@dataclass
class Prediction:
    """One case's result, on the grid of its input (``shape``, ``affine``)."""

    case_id: str
    #: label map in ``label_scheme`` numbering, uint8
    labels: np.ndarray
    label_scheme: str
    #: ``[3, *shape]`` float32 probabilities of TC, WT, ET
    probabilities: np.ndarray
    affine: np.ndarray
    #: the header of the input file the outputs copy (None for arrays)
    header: nib.Nifti1Header | None
    sequences_used: tuple[str, ...]
    tta: bool = False
    #: sequence -> ``[3, *shape]`` float32 contribution to TC, WT, ET (see contributions.py)
    contributions: dict[str, np.ndarray] = field(default_factory=dict)
    contribution_method: str | None = None
    seconds: float = 0.0
    inputs: dict[str, str | None] = field(default_factory=dict)
    #: the clean-up applied (rules, voxels removed per region; see postprocessing.py), None: none
    postprocessing: dict[str, Any] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.labels.shape)

    @cached_property
    def regions(self) -> np.ndarray:
        """``[3, *shape]`` bool masks of TC, WT, ET, nested as in the label map (computed
        once: volumes, shares and the summary all read it)."""
        brats2021 = self.labels if self.label_scheme == "brats2021" else to_brats2021(self.labels, self.label_scheme)
        return np.stack([np.isin(brats2021, (1, 4)), brats2021 > 0, brats2021 == 4])

    @property
    def voxel_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def volumes_ml(self) -> dict[str, float]:
        """Volume of each region (TC, WT, ET) and of each label, in millilitres."""
        volumes = {region: float(mask.sum()) * self.voxel_ml for region, mask in zip(REGIONS, self.regions)}
        for value, name in SCHEMES[self.label_scheme].labels.items():
            volumes[f"label {value} {name}"] = float((self.labels == value).sum()) * self.voxel_ml
        return volumes

    def shares(self) -> dict[str, dict[str, float]]:
        """Each sequence's share of TC, WT and ET (empty without contribution maps)."""
        return region_shares(self.contributions, self.regions) if self.contributions else {}

    def summary(self) -> dict[str, Any]:
        """What the case's JSON holds (everything but the voxel maps)."""
        regions = self.regions
        return {
            "case_id": self.case_id,
            "label_scheme": self.label_scheme,
            "labels": {str(v): n for v, n in SCHEMES[self.label_scheme].labels.items()},
            "shape": list(self.shape),
            "voxel_size_mm": [round(float(v), 6) for v in np.linalg.norm(self.affine[:3, :3], axis=0)],
            "volumes_ml": {k: round(v, 4) for k, v in self.volumes_ml().items()},
            "sequences_used": list(self.sequences_used),
            "sequences_missing": [m for m in MODALITIES if m not in self.sequences_used],
            "inputs": self.inputs,
            "tta": self.tta,
            "postprocessing": self.postprocessing,
            "contributions": None if not self.contributions else {
                "method": self.contribution_method, "shares": self.shares(),
                "mean_in_region": {
                    region: {seq: float(m[r][regions[r]].mean()) if regions[r].any() else 0.0
                             for seq, m in self.contributions.items()}
                    for r, region in enumerate(REGIONS)
                },
            },
            "seconds": round(self.seconds, 3),
        }
