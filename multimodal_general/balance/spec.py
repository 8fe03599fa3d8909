"""Which balancer a run uses: one :class:`BalancerSpec` (the balancer's name, CGGM's preset, rho
and lambda, the heads' metric, the other hyperparameters), checked when it is made, named by one
method label and built into the balancer.

>>> spec = BalancerSpec.parse("cggm-paper", lam=0.2)
>>> spec.method
'cggm-paper'
>>> balancer = spec.build(modalities, fused_last_layer=model.head[-1], criterion=criterion)

Method labels (:data:`METHODS`): a balancer's name (``none``, ``ogm_ge``, ...) or
``cggm-<preset>``, CGGM with one of its presets; ``cggm`` alone is CGGM with the spec's preset.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from multimodal_general.balance.base import Balancer
from multimodal_general.balance.cggm import CGGM_PRESETS, DEFAULT_RHO, check_cggm_settings
from multimodal_general.balance.factory import BALANCERS, check_balancer_options, make_balancer
from multimodal_general.balance.metrics import resolve_metric
from multimodal_general.balance.registration import Modality
from multimodal_general.errors import ConfigurationError

#: CGGM with each of its presets, as method labels
CGGM_METHODS = tuple(f"cggm-{preset}" for preset in CGGM_PRESETS)
#: every method label: a balancer's name, or CGGM with one of its presets
METHODS = (*BALANCERS, *CGGM_METHODS)
#: the names a flat run record (a sequence task's ``config.yaml``, an imbalance run's settings)
#: gives the spec's fields
FLAT_NAMES = {"name": "balancer", "preset": "preset", "rho": "rho", "lam": "lam", "metric": "metric",
              "options": "balancer_options"}


@dataclass(frozen=True)
class BalancerSpec:
    """Which balancer, with which hyperparameters. A value that cannot work is refused when the
    spec is made (a one-line :class:`ConfigurationError`), before a loop reads any data.

    Args:
        name: one of :data:`~multimodal_general.balance.BALANCERS`.
        preset: CGGM's variant, one of :data:`~multimodal_general.balance.CGGM_PRESETS`.
        rho: CGGM's scale of the coefficients, > 0 (default :data:`DEFAULT_RHO`).
        lam: CGGM's weight of the direction loss, >= 0.
        metric: how the unimodal heads' utilization is scored (one of
            :data:`~multimodal_general.balance.METRICS`); None: the loop's choice for its task.
        options: the other balancers' own hyperparameters (e.g. ``{"alpha": 0.5}``); each
            balancer takes the ones it declares.
    """

    name: str = "none"
    preset: str = "stable"
    rho: float = DEFAULT_RHO
    lam: float = 0.1
    metric: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in BALANCERS:
            raise ConfigurationError(f"unknown balancer '{self.name}'; choose one of {sorted(BALANCERS)}")
        check_cggm_settings(self.preset, self.rho, self.lam)
        if self.metric is not None:
            resolve_metric(self.metric)
        check_balancer_options(self.options)
        own = sorted(set(self.options) & {"preset", "rho", "lam", "metric"})
        if own:
            raise ConfigurationError(f"options: {', '.join(own)} has a setting of its own")

    @property
    def method(self) -> str:
        """The method label: ``cggm-<preset>`` for CGGM, else the balancer's name."""
        return f"cggm-{self.preset}" if self.name == "cggm" else self.name

    @classmethod
    def parse(cls, method: str, **settings: Any) -> BalancerSpec:
        """The spec a method label names (``none``, ``cggm``, ``cggm-paper``, ``ogm_ge``, ...),
        with ``settings`` (``rho``, ``lam``, ``options``...) for the rest; the label's balancer
        and preset win over theirs."""
        name, dash, preset = method.partition("-")
        if dash and name != "cggm":
            raise ConfigurationError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
        return cls(**{**settings, "name": name, **({"preset": preset} if dash else {})})

    def with_method(self, method: str) -> BalancerSpec:
        """This spec with the balancer (and CGGM preset) that the label ``method`` names."""
        return self.parse(method, **{f.name: getattr(self, f.name) for f in fields(self)})

    def build(self, modalities: Sequence[Modality], **common: Any) -> Balancer:
        """The balancer over ``modalities`` (:func:`~multimodal_general.balance.make_balancer`),
        with the loop's ``common`` options (criterion, fused_last_layer, metric, ...); the
        spec's metric, when it names one, replaces the loop's."""
        own = {"preset": self.preset, "rho": self.rho, "lam": self.lam, **self.options}
        if self.metric is not None:
            own["metric"] = self.metric
        return make_balancer(self.name, modalities, **{**common, **own})

    def flat(self) -> dict[str, Any]:
        """The spec under its flat names (:data:`FLAT_NAMES`; ``metric`` only when set)."""
        values = {FLAT_NAMES[f.name]: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        if self.metric is None:
            del values["metric"]
        return values

    @classmethod
    def from_flat(cls, record: Mapping[str, Any]) -> tuple[BalancerSpec, dict[str, Any]]:
        """The spec in a flat record, and the record's other values."""
        rest = dict(record)
        return cls(**{name: rest.pop(flat) for name, flat in FLAT_NAMES.items() if flat in rest}), rest


def flat_record(config: Any, order: Sequence[str]) -> dict[str, Any]:
    """``config``, a dataclass whose ``balancer`` is a :class:`BalancerSpec`, as the flat record
    its runs are saved with: the spec's fields under their flat names, the keys in ``order``
    (the order of the files written before configurations held a spec), any other after them."""
    values = {f.name: copy.deepcopy(getattr(config, f.name)) for f in fields(config) if f.name != "balancer"}
    values.update(config.balancer.flat())
    return {**{key: values.pop(key) for key in order if key in values}, **values}
