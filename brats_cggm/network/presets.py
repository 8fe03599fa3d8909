"""Named network configurations: ``build_network("default" | "small" | "early_fusion")``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from brats_cggm.errors import ConfigurationError
from brats_cggm.network.early_fusion import EarlyFusionUNet
from brats_cggm.network.multi_branch_unet import MultiBranchUNet


@dataclass(frozen=True)
class NetworkPreset:
    name: str
    network: type[nn.Module]
    options: dict[str, Any]
    patch_size: tuple[int, int, int]
    """The training patch the preset is sized for."""
    summary: str = field(default="", compare=False)


NETWORK_PRESETS: dict[str, NetworkPreset] = {
    preset.name: preset
    for preset in (
        NetworkPreset(
            "default", MultiBranchUNet,
            {"channels": (16, 32, 64, 128), "strides": (2, 2, 2, 2), "num_res_units": 2, "head_channels": 16},
            (128, 128, 128),
            "four branches 16-32-64-128 with a strided stem; one GPU, 128^3 patches",
        ),
        NetworkPreset(
            "small", MultiBranchUNet,
            {"channels": (8, 16, 32, 64), "strides": (2, 2, 2, 2), "num_res_units": 1, "head_channels": 8},
            (64, 64, 64),
            "four narrow branches 8-16-32-64; trains on a CPU in minutes, 64^3 patches",
        ),
        NetworkPreset(
            "early_fusion", EarlyFusionUNet,
            {"channels": (16, 32, 64, 128), "strides": (2, 2, 2), "num_res_units": 2},
            (128, 128, 128),
            "MONAI UNet 16-32-64-128 over the 4 stacked sequences (baseline); masks only zero inputs",
        ),
    )
}


def build_network(preset: str = "default", **overrides: Any) -> nn.Module:
    """The network of a preset, with constructor arguments overridden by ``overrides``
    (e.g. ``sequence_dropout=0.25``, ``channels=(8, 16, 32, 64)``)."""
    try:
        chosen = NETWORK_PRESETS[preset]
    except KeyError:
        raise ConfigurationError(
            f"unknown network preset '{preset}'; choose one of {sorted(NETWORK_PRESETS)}"
        ) from None
    try:
        return chosen.network(**{**chosen.options, **overrides})
    except TypeError as error:
        raise ConfigurationError(f"network preset '{preset}': {error}") from None
