"""Balancers: what a multimodal training loop calls around backward.

>>> balancer = make_balancer("cggm", modalities, fused_last_layer=model.head[-1],
...                          criterion=nn.CrossEntropyLoss(), metric="accuracy")

See :mod:`multimodal_general.balance.base` for the loop contract.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from multimodal_general.balance.agm import AGM, concat_unimodal_output
from multimodal_general.balance.base import Balancer
from multimodal_general.balance.cggm import CGGM, PRESETS, CGGMPreset
from multimodal_general.balance.gblending import GBlending
from multimodal_general.balance.joint import JointTraining
from multimodal_general.balance.metrics import METRICS, resolve_metric
from multimodal_general.balance.mmpareto import MMPareto
from multimodal_general.balance.modality_dropout import ModalityDropout, drop_mask
from multimodal_general.balance.mslr import MSLR
from multimodal_general.balance.ogm_ge import OGMGE
from multimodal_general.balance.registration import Modality
from multimodal_general.balance.telemetry import StepTelemetry
from multimodal_general.errors import ConfigurationError

BALANCERS: dict[str, type[Balancer]] = {
    cls.name: cls for cls in (JointTraining, CGGM, OGMGE, MMPareto, AGM, ModalityDropout, MSLR, GBlending)
}


def make_balancer(name: str, modalities: Sequence[Modality], **options) -> Balancer:
    """Build a balancer by name (``none``, ``cggm``) with its keyword options."""
    try:
        cls = BALANCERS[name]
    except KeyError:
        raise ConfigurationError(
            f"unknown balancer '{name}'; choose one of {sorted(BALANCERS)}"
        ) from None
    # One configuration serves every balancer: each takes the options it declares, and
    # an option that no balancer declares is a mistake.
    known = {p for c in BALANCERS.values() for p in inspect.signature(c.__init__).parameters} - {"self", "modalities"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigurationError(f"unknown balancer option(s): {unknown}")
    accepted = inspect.signature(cls.__init__).parameters
    return cls(modalities, **{k: v for k, v in options.items() if k in accepted})


__all__ = [
    "AGM",
    "BALANCERS",
    "CGGM",
    "METRICS",
    "MSLR",
    "OGMGE",
    "PRESETS",
    "Balancer",
    "CGGMPreset",
    "GBlending",
    "JointTraining",
    "MMPareto",
    "Modality",
    "ModalityDropout",
    "StepTelemetry",
    "concat_unimodal_output",
    "drop_mask",
    "make_balancer",
    "resolve_metric",
]
