"""How a case becomes network input, as checkpoints and model cards record it.

Torch-free on purpose: the model card is checked with it in the ONNX-only install
(``pip install brats-cggm``), where MONAI is absent. The MONAI chains
(:mod:`brats_cggm.data.transforms`) and the numpy chain (:mod:`brats_cggm.inference.grid`)
both read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from brats_cggm.errors import ConfigurationError

#: after resampling, a value whose magnitude is within this fraction of its sequence's
#: largest value is set to 0. Resampling the background (exact zeros) next to the brain leaves values like
#: 1e-13 x the maximum where an interpolation weight is float rounding (torch's grid in the
#: MONAI chain; MONAI 1.6 on a BraTS 2023 case: 1.8 % of the "non-zero" voxels at 2 mm).
#: Left in, they would count as foreground for the crop and as brain for the z-score,
#: moving both by float noise; both chains drop them.
NOISE_FLOOR = 1e-6

#: a sequence whose smallest value is not 0 and fills at least this share of the volume has a
#: constant background (an image z-scored upstream: BraTS 2015's DeepMedic copies hold the
#: z-score of 0, -2.7 to -6.2, in 81-86 % of their voxels). Both chains set it to 0 first, so
#: that the crop and the z-score see the brain only, as they do on raw intensities.
BACKGROUND_SHARE = 0.2


def constant_background(channel: Any) -> Any | None:
    """The voxels of one sequence (a numpy array) that hold its constant background: its
    smallest value where that is not 0 and at least :data:`BACKGROUND_SHARE` of the voxels
    hold it; ``None`` when it has none (raw intensities: their background is 0)."""
    if not channel.size:
        return None
    floor = channel.min()
    if floor == 0:
        return None
    background = channel == floor
    return background if background.sum() >= BACKGROUND_SHARE * channel.size else None


#: the only normalisation the pipelines implement (named in checkpoints and model cards)
NORMALIZATION = "zscore-nonzero-channelwise"

#: torchio transform of each artefact option of :class:`PreprocessConfig`
ARTEFACTS = {
    "bias_field": "RandomBiasField",
    "ghosting": "RandomGhosting",
    "motion": "RandomMotion",
    "noise": "RandomNoise",
}


@dataclass(frozen=True)
class PreprocessConfig:
    """How a case becomes network input; stored in checkpoints and model cards.

    Probabilities are per patch; an artefact probability of 0 leaves that artefact out.
    """

    #: output voxel size in mm, in the orientation below
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    #: axis codes of the output grid (nibabel convention: "RAS" = +x right, +y anterior, +z superior)
    orientation: str = "RAS"
    normalization: str = NORMALIZATION
    #: training patch size in voxels (also the sliding-window size at inference)
    patch_size: tuple[int, int, int] = (128, 128, 128)
    #: fraction of patches centred on tumour (the rest centred anywhere else in the crop)
    pos_fraction: float = 0.67
    #: patches drawn from each volume per visit
    num_samples: int = 2
    #: probability of a flip, per spatial axis
    flip_prob: float = 0.5
    #: probability of an intensity scale by a factor in [1 - scale, 1 + scale] (and, independently, of a shift)
    intensity_prob: float = 0.5
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    #: probabilities of torchio's MRI artefacts, applied to the image of a patch
    bias_field: float = 0.0
    ghosting: float = 0.0
    motion: float = 0.0
    noise: float = 0.0

    def __post_init__(self) -> None:
        spacing, patch = tuple(self.spacing), tuple(self.patch_size)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ConfigurationError(f"spacing must be three positive numbers (mm), not {spacing}")
        if len(patch) != 3 or any(v < 1 or v != int(v) for v in patch):
            raise ConfigurationError(f"patch_size must be three positive whole numbers, not {patch}")
        axes = self.orientation.upper()
        pairs = ("LR", "AP", "SI")  # one code from each pair, in any order
        if sorted(next((p for p in pairs if a in p), a) for a in axes) != sorted(pairs):
            raise ConfigurationError(f"orientation must be three axis codes like RAS or LPS, not '{self.orientation}'")
        if self.normalization != NORMALIZATION:
            raise ConfigurationError(f"normalization '{self.normalization}' is not supported (only {NORMALIZATION})")
        if self.num_samples < 1:
            raise ConfigurationError(f"num_samples must be at least 1, not {self.num_samples}")
        for name in ("pos_fraction", "flip_prob", "intensity_prob", *ARTEFACTS):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigurationError(f"{name} must lie in [0, 1], not {getattr(self, name)}")
        if min(self.intensity_scale, self.intensity_shift) < 0:
            raise ConfigurationError("intensity_scale and intensity_shift must not be negative")
        object.__setattr__(self, "spacing", tuple(float(v) for v in spacing))
        object.__setattr__(self, "patch_size", tuple(int(v) for v in patch))
        object.__setattr__(self, "orientation", axes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PreprocessConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigurationError(f"unknown preprocessing setting(s): {', '.join(unknown)}")
        return cls(**values)
