"""Balancers by name: the registry of every balancer class, the options each declares, and
:func:`make_balancer`, which builds one from its name and options."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from multimodal_general.balance.agm import AGM
from multimodal_general.balance.base import COMMON_OPTIONS, Balancer
from multimodal_general.balance.cggm import CGGM
from multimodal_general.balance.gblending import GBlending
from multimodal_general.balance.joint import JointTraining
from multimodal_general.balance.mmpareto import MMPareto
from multimodal_general.balance.modality_dropout import ModalityDropout
from multimodal_general.balance.mslr import MSLR
from multimodal_general.balance.ogm_ge import OGMGE
from multimodal_general.balance.registration import Modality
from multimodal_general.errors import ConfigurationError

BALANCERS: dict[str, type[Balancer]] = {
    cls.name: cls for cls in (JointTraining, CGGM, OGMGE, MMPareto, AGM, ModalityDropout, MSLR, GBlending)
}


def own_options(cls: type[Balancer]) -> set[str]:
    """The hyperparameters a balancer class declares itself (not the common options)."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {p.name for p in parameters if p.kind in named} - {"self", "modalities"} - COMMON_OPTIONS


def balancer_options(name: str | None = None) -> set[str]:
    """The keyword options balancer ``name`` takes (every balancer's when ``None``): its own
    hyperparameters and the common options (:data:`~multimodal_general.balance.base.COMMON_OPTIONS`)."""
    classes = BALANCERS.values() if name is None else [BALANCERS[name]]
    return {p for c in classes for p in own_options(c)} | COMMON_OPTIONS


def check_balancer_options(options) -> None:
    """An option that no balancer declares is a mistake (one line, before anything runs)."""
    unknown = sorted(set(options) - balancer_options())
    if unknown:
        raise ConfigurationError(f"unknown balancer option(s): {unknown}")


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
    check_balancer_options(options)
    accepted = balancer_options(name)
    return cls(modalities, **{k: v for k, v in options.items() if k in accepted})
