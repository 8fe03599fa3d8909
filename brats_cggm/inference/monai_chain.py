"""The segmenter's MONAI chain: the card's preprocessing with MONAI's transforms, MONAI's
sliding-window inference with Gaussian blending, and MONAI's inversion to the input's
grid (:func:`~brats_cggm.data.transforms.invert_prediction`): the transforms training and
evaluation use. Needs torch and MONAI; the numpy chain (``grid.py``, ``windows.py``) does
the same without them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference

from brats_cggm import MODALITIES
from brats_cggm.data.transforms import image_transforms, invert_prediction
from brats_cggm.inference.windows import window_count

if TYPE_CHECKING:
    from brats_cggm.inference.segmenter import Segmenter


def monai_maps(segmenter: Segmenter, arrays: Mapping[str, np.ndarray], affine: np.ndarray,
               predict: Callable[[np.ndarray], np.ndarray],
               progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """The blended maps of ``predict`` (numpy windows in and out) over the case
    ``arrays`` on the grid ``affine``, inverted to that grid: float32 ``[K, *shape]``."""
    shape = next(iter(arrays.values())).shape
    image = np.zeros((len(MODALITIES), *shape), dtype=np.float32)
    for i, m in enumerate(MODALITIES):
        if m in arrays:
            image[i] = arrays[m]
    chain = image_transforms(segmenter.preprocessing)
    data = chain({"image": MetaTensor(torch.from_numpy(image), affine=torch.as_tensor(affine, dtype=torch.float64))})
    image_t = data["image"].as_tensor()[None]
    total = window_count(image_t.shape[2:], segmenter.patch_size, segmenter.overlap)
    done = 0

    def windows(batch: torch.Tensor) -> torch.Tensor:
        nonlocal done
        out = torch.from_numpy(predict(batch.numpy()))
        done = min(done + batch.shape[0], total)
        if progress is not None:
            progress(done, total)
        return out

    outputs = sliding_window_inference(
        image_t, segmenter.patch_size, segmenter.sw_batch_size, windows, overlap=segmenter.overlap,
        mode=segmenter.blend_mode, sigma_scale=segmenter.sigma_scale, device=torch.device("cpu"),
    )
    data["pred"] = MetaTensor(outputs[0])  # Invertd inverts MetaTensors only
    return invert_prediction(data, chain).as_tensor().numpy().astype(np.float32, copy=False)
