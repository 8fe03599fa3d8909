"""The segmenter's MONAI chain: the card's preprocessing with MONAI's transforms, MONAI's
sliding-window inference with Gaussian blending, and MONAI's inversion to the input's
grid (:func:`~brats_cggm.data.transforms.invert_prediction`): the transforms training and
evaluation use. Needs torch and MONAI; the numpy chain (:mod:`~brats_cggm.inference.numpy_chain`)
does the same without them, with the same arguments and result."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference

from brats_cggm import MODALITIES
from brats_cggm.data.preprocessing import PreprocessConfig
from brats_cggm.data.transforms import image_transforms, invert_prediction
from brats_cggm.inference.windows import Windowing, window_count


def monai_maps(arrays: Mapping[str, np.ndarray], affine: np.ndarray, preprocessing: PreprocessConfig,
               windowing: Windowing, predict: Callable[[np.ndarray], np.ndarray],
               progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """The blended maps of ``predict`` (numpy windows in and out) over the case
    ``arrays`` on the grid ``affine``, inverted to that grid: float32 ``[K, *shape]``."""
    shape = next(iter(arrays.values())).shape
    image = np.zeros((len(MODALITIES), *shape), dtype=np.float32)
    for i, m in enumerate(MODALITIES):
        if m in arrays:
            image[i] = arrays[m]
    chain = image_transforms(preprocessing)
    data = chain({"image": MetaTensor(torch.from_numpy(image), affine=torch.as_tensor(affine, dtype=torch.float64))})
    image_t = data["image"].as_tensor()[None]
    total = window_count(image_t.shape[2:], windowing.patch_size, windowing.overlap)
    done = 0

    def windows(batch: torch.Tensor) -> torch.Tensor:
        nonlocal done
        out = torch.from_numpy(predict(batch.numpy()))
        done = min(done + batch.shape[0], total)
        if progress is not None:
            progress(done, total)
        return out

    outputs = sliding_window_inference(
        image_t, windowing.patch_size, windowing.sw_batch_size, windows, overlap=windowing.overlap,
        mode=windowing.blend_mode, sigma_scale=windowing.sigma_scale, device=torch.device("cpu"),
    )
    data["pred"] = MetaTensor(outputs[0])  # Invertd inverts MetaTensors only
    return invert_prediction(data, chain).as_tensor().numpy().astype(np.float32, copy=False)
