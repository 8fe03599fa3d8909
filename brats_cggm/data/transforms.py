"""Training, validation and inference pipelines: MONAI transform chains over one case.

Every chain works on a data dict made by :func:`case_to_dict` (keys ``image``, ``label``
when the case has one, ``case_id``, ``scheme``, ``channels``) and starts with the same
deterministic prefix, which a cached dataset computes once per case::

    load -> channel first -> a zero channel per missing sequence -> canonical channel order
         -> constant background to 0
         -> orientation -> spacing
         -> labels renumbered to BraTS 2021 and split into [TC, WT, ET]
         -> crop to the image foreground -> z-score per channel on non-zero voxels

The training chain then adds its random part (tumour-weighted patches, flips, intensity
scale/shift, optional torchio MRI artefacts). The inference chain records every
geometric step, so :func:`invert_prediction` maps a prediction back to the input's grid
and affine.

Two small transforms exist because MONAI has none that reads per-case settings from the
data dict: :class:`CanonicalChannelsd` (the channel order of an MSD 4-D file, from
``channels``) and :class:`ToBrats2021d` (one MONAI ``MapLabelValue`` per label scheme,
picked by ``scheme``, so that data sets of different releases can be mixed).
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor, NibabelReader
from monai.transforms import (
    CastToTyped,
    Compose,
    ConvertToMultiChannelBasedOnBratsClassesd,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    Invertd,
    LoadImaged,
    MapLabelValue,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandTorchIOd,
    Spacingd,
    SpatialPadd,
)

from brats_cggm import MODALITIES
from brats_cggm.data.labels import SCHEMES
from brats_cggm.data.layouts import Case
from brats_cggm.data.preprocessing import (
    ARTEFACTS,
    NOISE_FLOOR,
    NORMALIZATION,
    PreprocessConfig,
    constant_background,
)
from brats_cggm.errors import BadInputFile, UserError


def case_to_dict(case: Case) -> dict[str, Any]:
    """The MONAI data dict of ``case``: file paths as strings, plus what the chains need
    to know about its layout (``scheme`` of the label, ``channels`` of a 4-D file)."""
    images = [str(p) for p in case.images if p is not None]
    data: dict[str, Any] = {
        "image": images if len(case.images) > 1 else images[0],
        "case_id": case.case_id,
        "scheme": case.label_scheme,
        "channels": list(case.channels) if len(case.images) == 1 else list(range(len(MODALITIES))),
        # which sequences the case has (the modality mask of its patches): a case found with
        # partial=True lacks some, and FillMissingSequencesd gives each a channel of zeros
        "available": torch.tensor([p is not None for p in case.images] if len(case.images) > 1
                                  else [True] * len(MODALITIES)),
    }
    if case.label is not None:
        data["label"] = str(case.label)
    return data


class CanonicalChannelsd(MapTransform):
    """Put the channels of ``keys`` in canonical order: ``channels[i]`` (read from the
    data dict) is the channel that holds ``MODALITIES[i]``."""

    def __init__(self, keys, channels_key: str = "channels") -> None:
        super().__init__(keys)
        self.channels_key = channels_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        order = [int(c) for c in d[self.channels_key]]
        for key in self.key_iterator(d):
            image = d[key]
            if image.shape[0] != len(MODALITIES):
                raise BadInputFile(_source(image), f"has {image.shape[0]} image channels, expected {len(MODALITIES)}")
            if order != list(range(len(MODALITIES))):
                d[key] = image[order]
        return d


class FillMissingSequencesd(MapTransform):
    """Give each sequence a case lacks (``available`` false) a channel of zeros, in its place
    in canonical order, so that every image has four channels; the modality mask switches it off."""

    def __init__(self, keys, available_key: str = "available") -> None:
        super().__init__(keys)
        self.available_key = available_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        available = [bool(v) for v in d.get(self.available_key, ())]
        if not available or all(available):
            return d
        for key in self.key_iterator(d):
            image = d[key]
            if image.shape[0] != sum(available):
                raise BadInputFile(_source(image), f"has {image.shape[0]} image channels, expected {sum(available)}")
            present = iter(image)
            channels = [next(present) if on else torch.zeros_like(image[0]) for on in available]
            d[key] = MetaTensor(torch.stack([torch.as_tensor(c) for c in channels]), meta=image.meta)
        return d


class ToBrats2021d(MapTransform):
    """Renumber label maps to BraTS 2021 values with MONAI's ``MapLabelValue``, choosing
    the label scheme of each case from ``scheme`` in the data dict. A value outside the
    scheme is an error naming the file (it would otherwise pass silently as background)."""

    def __init__(self, keys, scheme_key: str = "scheme") -> None:
        super().__init__(keys)
        self.scheme_key = scheme_key
        self.maps = {
            name: MapLabelValue(list(s.to_brats2021), list(s.to_brats2021.values()), dtype=np.uint8)
            for name, s in SCHEMES.items()
        }

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        scheme = d[self.scheme_key]
        for key in self.key_iterator(d):
            label = d[key]
            extra = sorted(set(torch.unique(torch.as_tensor(label)).tolist()) - SCHEMES[scheme].values)
            if extra:
                allowed = ", ".join(map(str, sorted(SCHEMES[scheme].values)))
                found = ", ".join(f"{v:g}" for v in extra)
                raise BadInputFile(_source(label), f"label value(s) {found} not in the {scheme} scheme ({allowed})")
            d[key] = self.maps[scheme](label)
        return d


class DropResamplingNoised(MapTransform):
    """Set to 0 every value of a channel whose magnitude is within ``NOISE_FLOOR`` of the
    channel's largest value: what resampling leaves of the exact-zero background by float rounding
    (see :data:`brats_cggm.data.preprocessing.NOISE_FLOOR`). In place; not inverted."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            for channel in image:
                floor = NOISE_FLOOR * max(float(channel.max()), 0.0) if channel.numel() else 0.0
                channel[channel.abs() <= floor] = 0
        return d


class ZeroConstantBackgroundd(MapTransform):
    """Set a sequence's constant background to 0 (an image z-scored upstream keeps the z-score
    of 0 there; :func:`~brats_cggm.data.preprocessing.constant_background`). In place."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            for channel in d[key]:
                background = constant_background(np.asarray(channel))
                if background is not None:
                    channel[torch.as_tensor(background)] = 0
        return d


def nonzero(image: Any) -> Any:
    """The crop's foreground: every non-zero voxel (z-scored brains have negative values)."""
    return image != 0


class ThreadSafeNibabelReader(NibabelReader):
    """MONAI's ``NibabelReader`` with the file names of a ``read`` kept per thread.

    ``NibabelReader.read`` stores the names it read on the instance and ``get_data`` zips
    the images with them, so when the threads that fill a ``CacheDataset`` share one reader
    (they share the transform), a thread reading a one-file label map between another
    thread's ``read`` and ``get_data`` of four sequences makes that case one channel
    (MONAI 1.6.1; half the cache fills of 24 cases with 4 threads failed so). Here each
    thread sees its own names.
    """

    def __init__(self, *args, **kwargs) -> None:
        self._local = threading.local()
        super().__init__(*args, **kwargs)

    @property
    def filenames(self):
        return getattr(self._local, "filenames", ())

    @filenames.setter
    def filenames(self, names) -> None:
        self._local.filenames = names

    def __getstate__(self) -> dict:  # a thread-local cannot be pickled (worker processes)
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()


class Pipeline(Compose):
    """A MONAI ``Compose`` that knows the configuration it was built from, and raises the
    project's user errors (a bad input file) as themselves: MONAI wraps every exception
    of a transform in a ``RuntimeError``."""

    def __init__(self, transforms: list, config: PreprocessConfig, needs_label: bool) -> None:
        super().__init__(transforms)
        self.config = config
        self.needs_label = needs_label

    def __call__(self, data, *args, **kwargs):
        try:
            return super().__call__(data, *args, **kwargs)
        except RuntimeError as error:
            cause = error.__cause__
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause from None


def _source(image: Any) -> str:
    meta = getattr(image, "meta", {})
    return str(meta.get("filename_or_obj", "<image>"))


def _prefix(cfg: PreprocessConfig, keys: list[str]) -> list:
    """The deterministic, cacheable steps shared by all chains."""
    loading = [
        LoadImaged(keys, reader=ThreadSafeNibabelReader(), image_only=True),
        EnsureChannelFirstd(keys),
        FillMissingSequencesd("image"),
        CanonicalChannelsd("image"),
    ]
    return loading + _geometry_and_intensity(cfg, keys)


def _geometry_and_intensity(cfg: PreprocessConfig, keys: list[str]) -> list:
    """The steps after loading: orientation, spacing (and its rounding noise dropped),
    (labels), crop, normalisation."""
    modes = ["bilinear", "nearest"][: len(keys)]
    steps = [
        ZeroConstantBackgroundd("image"),
        Orientationd(keys, axcodes=cfg.orientation, labels=None),
        Spacingd(keys, pixdim=cfg.spacing, mode=modes),
        DropResamplingNoised("image"),
    ]
    if "label" in keys:
        steps += [ToBrats2021d("label"), ConvertToMultiChannelBasedOnBratsClassesd("label")]
    return steps + [
        CropForegroundd(keys, source_key="image", select_fn=nonzero),
        NormalizeIntensityd("image", nonzero=True, channel_wise=True),
    ]


def train_transforms(cfg: PreprocessConfig) -> Pipeline:
    """Load, preprocess and draw ``cfg.num_samples`` augmented patches from a labelled case.

    Output per patch: ``image`` float32 ``[4, *patch_size]``, ``label`` float32
    ``[3, *patch_size]`` (TC, WT, ET in {0, 1}).
    """
    keys = ["image", "label"]
    steps = _prefix(cfg, keys) + [
        SpatialPadd(keys, spatial_size=cfg.patch_size),
        # MONAI reads a multi-channel label as one-hot and drops channel 0 (TC): the
        # positives are WT | ET = WT, i.e. patches centred on any tumour voxel.
        RandCropByPosNegLabeld(
            keys,
            label_key="label",
            spatial_size=cfg.patch_size,
            pos=cfg.pos_fraction,
            neg=1.0 - cfg.pos_fraction,
            num_samples=cfg.num_samples,
        ),
        *(RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=axis) for axis in range(3)),
        RandScaleIntensityd("image", factors=cfg.intensity_scale, prob=cfg.intensity_prob),
        RandShiftIntensityd("image", offsets=cfg.intensity_shift, prob=cfg.intensity_prob),
        *(
            RandTorchIOd("image", ARTEFACTS[name], p=getattr(cfg, name))
            for name in ARTEFACTS
            if getattr(cfg, name) > 0
        ),
        # plain float tensors: torchio returns them for the patches it alters (and MONAI
        # would not collate them with MetaTensors), and training needs no metadata
        EnsureTyped(keys, dtype=torch.float32, track_meta=False),
    ]
    return Pipeline(steps, cfg, needs_label=True)


def val_transforms(cfg: PreprocessConfig) -> Pipeline:
    """Load and preprocess a labelled case whole (cropped to its foreground)."""
    keys = ["image", "label"]
    return Pipeline(_prefix(cfg, keys) + [CastToTyped("label", dtype=np.float32)], cfg, needs_label=True)


def inference_transforms(cfg: PreprocessConfig) -> Pipeline:
    """Load and preprocess the image of a case, recording every geometric step for
    :func:`invert_prediction` (keep this instance to invert with)."""
    return Pipeline(_prefix(cfg, ["image"]), cfg, needs_label=False)


def image_transforms(cfg: PreprocessConfig) -> Pipeline:
    """The inference chain for an image already in memory: ``{"image": MetaTensor [4,
    X, Y, Z]}`` in canonical channel order, with its affine (what the segmenter loads from
    files or takes as arrays) -> network input, recording every geometric step for
    :func:`invert_prediction`."""
    return Pipeline(_geometry_and_intensity(cfg, ["image"]), cfg, needs_label=False)


def invert_prediction(
    data: Mapping[Hashable, Any],
    transforms: Compose,
    key: str = "pred",
    nearest: bool = False,
) -> torch.Tensor:
    """``data[key]`` (channels first, on the grid of ``data["image"]`` after
    ``transforms``) resampled back to the input's original grid. ``data`` is one case,
    not a batch (``monai.data.decollate_batch`` splits one).

    Returns a MetaTensor whose spatial shape and ``affine`` are those of the input file.
    ``nearest=True`` for label maps or masks; probabilities use linear interpolation.
    """
    inverted = Invertd(keys=key, transform=transforms, orig_keys="image", nearest_interp=nearest)(dict(data))
    return inverted[key]


__all__ = ["ARTEFACTS", "NORMALIZATION", "PreprocessConfig"]  # re-exported: defined in preprocessing.py
