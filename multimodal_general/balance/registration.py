"""Explicit registration of the modalities a balancer acts on.

Parameters are never matched by name: each modality hands over its encoder module (whose
gradients a balancer may rescale) and, optionally, its unimodal head and that head's last
layer (which CGGM compares with the fused head's last layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from multimodal_general.errors import RegistrationError


@dataclass(frozen=True, eq=False)
class Modality:
    """One modality as a balancer sees it.

    Args:
        name: unique name, used in telemetry and state dicts.
        encoder: the module that turns this modality's input into features ``h_i``.
            Every parameter of it is "this modality's encoder" for gradient modulation.
        head: a light unimodal head that predicts the task target from ``h_i.detach()``.
            Training-only: it lives in the balancer, never in the inference model.
        head_last_layer: the head's last layer (a module with ``weight``, or the weight
            itself); its weight must have the shape of the fused head's last weight.
    """

    name: str
    encoder: nn.Module
    head: nn.Module | None = None
    head_last_layer: nn.Module | nn.Parameter | None = None


def last_weight(layer: nn.Module | nn.Parameter, what: str) -> nn.Parameter:
    """The weight a last layer is compared by: ``layer.weight``, or ``layer`` itself."""
    if isinstance(layer, nn.Parameter):
        return layer
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise RegistrationError(f"{what} has no `weight` parameter ({type(layer).__name__})")
    return weight


def validate_modalities(
    modalities: Sequence[Modality], *, need_heads: bool, min_count: int = 1
) -> None:
    """Fail with one clear message on any inconsistent registration."""
    if len(modalities) < min_count:
        raise RegistrationError(
            f"this balancer needs at least {min_count} modalities, got {len(modalities)}"
        )
    names = [m.name for m in modalities]
    bad = [n for n in names if not isinstance(n, str) or not n or "." in n]
    if bad:
        raise RegistrationError(f"modality names must be non-empty strings without '.', got {bad}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RegistrationError(f"modality names must be unique; repeated: {duplicates}")

    owner: dict[int, str] = {}
    for modality in modalities:
        params = list(modality.encoder.parameters())
        if not params:
            raise RegistrationError(f"encoder of modality '{modality.name}' has no parameters")
        for p in params:
            other = owner.setdefault(id(p), modality.name)
            if other != modality.name:
                raise RegistrationError(
                    f"a parameter of shape {tuple(p.shape)} is in the encoders of both "
                    f"'{other}' and '{modality.name}': encoders must not share parameters"
                )
        if need_heads and (modality.head is None or modality.head_last_layer is None):
            raise RegistrationError(
                f"modality '{modality.name}' needs a head and its head_last_layer"
            )

    for modality in modalities:
        if modality.head is None:
            continue
        for p in modality.head.parameters():
            if id(p) in owner:
                raise RegistrationError(
                    f"head of modality '{modality.name}' shares a parameter with the encoder "
                    f"of '{owner[id(p)]}': heads must be separate modules"
                )
        if modality.head_last_layer is not None:
            weight = last_weight(modality.head_last_layer, f"head_last_layer of '{modality.name}'")
            if not any(weight is p for p in modality.head.parameters()):
                raise RegistrationError(
                    f"head_last_layer of modality '{modality.name}' is not part of its head"
                )


def validate_fused_last_layer(
    modalities: Sequence[Modality], fused_last_layer: nn.Module | nn.Parameter
) -> nn.Parameter:
    """The fused head's last weight, checked against every head's last weight."""
    fused = last_weight(fused_last_layer, "fused_last_layer")
    for modality in modalities:
        if any(fused is p for p in modality.encoder.parameters()):
            raise RegistrationError(
                f"fused_last_layer is inside the encoder of '{modality.name}'; it must be the "
                "last layer of the fused prediction head"
            )
        head_weight = last_weight(modality.head_last_layer, f"head_last_layer of '{modality.name}'")
        if head_weight.shape != fused.shape:
            raise RegistrationError(
                f"head of modality '{modality.name}' ends in a weight of shape "
                f"{tuple(head_weight.shape)}, but the fused head's last weight has shape "
                f"{tuple(fused.shape)}: the unimodal heads must predict what the fused head predicts"
            )
    return fused
