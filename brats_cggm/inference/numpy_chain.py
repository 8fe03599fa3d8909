"""The segmenter's numpy chain: the card's preprocessing (:mod:`~brats_cggm.inference.grid`),
the sliding window with its blending (:mod:`~brats_cggm.inference.windows`) and the
inversion to the input's grid, with numpy and nibabel only: the chain of the
torch-free install. :mod:`~brats_cggm.inference.monai_chain` does the same with MONAI's
transforms, with the same arguments and result."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from brats_cggm import MODALITIES
from brats_cggm.data.preprocessing import PreprocessConfig
from brats_cggm.inference.grid import preprocess
from brats_cggm.inference.windows import Windowing, sliding_window


def numpy_maps(arrays: Mapping[str, np.ndarray], affine: np.ndarray, preprocessing: PreprocessConfig,
               windowing: Windowing, predict: Callable[[np.ndarray], np.ndarray],
               progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """The blended maps of ``predict`` (numpy windows in and out) over the case
    ``arrays`` on the grid ``affine``, inverted to that grid: float32 ``[K, *shape]``.
    Raises :class:`~brats_cggm.inference.grid.EmptyImage` when no voxel is above 0."""
    image, geometry = preprocess(arrays, MODALITIES, affine, preprocessing)
    return geometry.invert(sliding_window(image, windowing, predict, progress))
