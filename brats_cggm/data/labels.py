"""Label schemes of the BraTS releases and the regions TC, WT, ET.

The network predicts three overlapping regions (sigmoid channels, in this order):
``TC`` tumour core, ``WT`` whole tumour, ``ET`` enhancing tumour. Every label scheme maps
to them through BraTS 2021 numbering (1 NCR, 2 ED, 4 ET): the pipelines renumber with
MONAI's ``MapLabelValued`` and split with ``ConvertToMultiChannelBasedOnBratsClassesd``;
:func:`labels_from_regions` goes back, for writing label maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REGIONS = ("TC", "WT", "ET")


@dataclass(frozen=True)
class LabelScheme:
    name: str
    #: label value -> name, background excluded
    labels: dict[int, str]
    #: label value -> the BraTS 2021 value with the same meaning
    to_brats2021: dict[int, int]

    @property
    def values(self) -> frozenset[int]:
        return frozenset({0, *self.labels})

    @property
    def from_brats2021(self) -> dict[int, int]:
        return {v: k for k, v in self.to_brats2021.items()}


SCHEMES: dict[str, LabelScheme] = {
    scheme.name: scheme
    for scheme in (
        LabelScheme(
            "brats2021",
            {1: "necrotic tumour core (NCR)", 2: "peritumoral oedema (ED)", 4: "enhancing tumour (ET)"},
            {1: 1, 2: 2, 4: 4},
        ),
        LabelScheme(
            "brats2023",
            {1: "non-enhancing tumour core (NETC)", 2: "surrounding FLAIR hyperintensity (SNFH)", 3: "enhancing tumour (ET)"},
            {1: 1, 2: 2, 3: 4},
        ),
        LabelScheme(
            "msd",
            {1: "oedema", 2: "non-enhancing tumour", 3: "enhancing tumour"},
            {1: 2, 2: 1, 3: 4},
        ),
    )
}


def labels_from_regions(regions: np.ndarray, scheme: str = "brats2021") -> np.ndarray:
    """A label map from ``[3, *shape]`` region masks (TC, WT, ET), made consistent by
    nesting (ET inside TC inside WT), in ``scheme`` numbering."""
    tc, wt, et = (np.asarray(r, dtype=bool) for r in regions)
    label = np.zeros(tc.shape, dtype=np.uint8)
    label[wt | tc | et] = 2
    label[tc | et] = 1
    label[et] = 4
    return to_scheme(label, scheme)


def renumber(label: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """``label`` with every value in ``mapping`` replaced by its image; 0 elsewhere."""
    out = np.zeros_like(label)
    for source, target in mapping.items():
        out[label == source] = target
    return out


def to_scheme(label: np.ndarray, scheme: str) -> np.ndarray:
    """A BraTS 2021 label map in ``scheme`` numbering (for writing files)."""
    return renumber(label, SCHEMES[scheme].from_brats2021)


def to_brats2021(label: np.ndarray, scheme: str) -> np.ndarray:
    """A label map in ``scheme`` numbering, in BraTS 2021 numbering (1 NCR, 2 ED, 4 ET)."""
    return renumber(label, SCHEMES[scheme].to_brats2021)
