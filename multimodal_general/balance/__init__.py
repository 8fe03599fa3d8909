"""Balancers: what a multimodal training loop calls around backward.

>>> balancer = make_balancer("cggm", modalities, fused_last_layer=model.head[-1],
...                          criterion=nn.CrossEntropyLoss(), metric="accuracy")

or, from a run's description of its balancer (:class:`BalancerSpec`)::

>>> balancer = BalancerSpec.parse("cggm-paper", rho=1.2).build(modalities, fused_last_layer=...)

See :mod:`multimodal_general.balance.base` for the loop contract.
"""

from __future__ import annotations

from multimodal_general.balance.agm import AGM, concat_unimodal_output
from multimodal_general.balance.base import COMMON_OPTIONS, Balancer, CommonOptions, Validation
from multimodal_general.balance.cggm import CGGM, CGGM_PRESETS, CGGMPreset
from multimodal_general.balance.factory import (
    BALANCERS,
    balancer_options,
    check_balancer_options,
    make_balancer,
    own_options,
)
from multimodal_general.balance.gblending import GBlending
from multimodal_general.balance.joint import JointTraining
from multimodal_general.balance.metrics import METRICS, resolve_metric
from multimodal_general.balance.mmpareto import MMPareto
from multimodal_general.balance.modality_dropout import ModalityDropout, drop_mask
from multimodal_general.balance.mslr import MSLR
from multimodal_general.balance.ogm_ge import OGMGE
from multimodal_general.balance.registration import Modality
from multimodal_general.balance.spec import CGGM_METHODS, DEFAULT_RHO, METHODS, BalancerSpec
from multimodal_general.balance.telemetry import StepTelemetry

__all__ = [
    "AGM",
    "BALANCERS",
    "CGGM",
    "CGGM_METHODS",
    "CGGM_PRESETS",
    "DEFAULT_RHO",
    "METHODS",
    "METRICS",
    "MSLR",
    "OGMGE",
    "COMMON_OPTIONS",
    "Balancer",
    "BalancerSpec",
    "CommonOptions",
    "CGGMPreset",
    "GBlending",
    "JointTraining",
    "MMPareto",
    "Modality",
    "ModalityDropout",
    "StepTelemetry",
    "Validation",
    "concat_unimodal_output",
    "drop_mask",
    "balancer_options",
    "check_balancer_options",
    "make_balancer",
    "own_options",
    "resolve_metric",
]
