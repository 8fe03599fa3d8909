"""MSLR: modality-specific learning rates (Yao & Mihalcea, Findings of ACL 2022).

Implemented as a fixed per-modality factor on each encoder's gradients after backward:
``g_i <- s_i * g_i``. For plain SGD without weight decay (momentum included) this is
exactly a learning rate ``s_i * lr`` for encoder i. It is **not** an LR scale under
Adam/AdamW (their update is invariant to a constant gradient scale) nor with weight decay
(the decay term is not scaled): there, give each encoder its own optimizer param group
with ``lr = s_i * lr`` (:meth:`MSLR.param_groups` builds them) and build the balancer with
``applied_by_optimizer=True``: it then leaves gradients alone and only keeps, adapts and
reports the scales; the loop sets each group's rate from :meth:`MSLR.lr_scales` after an
update (so a scale is never applied twice).

Adaptive variant (``update_from_validation``, which :meth:`MSLR.on_validation` calls with
each unimodal head's validation metric): after each validation, a modality whose
validation metric (higher is better) did not improve on its best by more than
``min_delta`` has its scale multiplied by ``decay`` (never below ``min_scale``); an
improving modality keeps its scale. This is our reading of the paper's "dynamic"
strategy (each modality's rate adapted from its own validation performance), documented
in ``docs/baselines.md``; the fixed scales are the paper's "keep" strategy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from multimodal_general.balance.base import Balancer, CommonOptions, Unpack, Validation
from multimodal_general.balance.registration import Modality
from multimodal_general.balance.telemetry import StepTelemetry
from multimodal_general.errors import ConfigurationError


class MSLR(Balancer):
    """MSLR: a learning-rate scale per modality encoder (as a gradient scale), fixed or adapted from validation.

    Args:
        modalities: the registered modalities (heads optional, trained and reported).
        scales: ``{modality: factor}``; a modality left out keeps 1.0.
        decay: factor applied to a modality's scale when its validation metric stalls.
        min_delta: improvement a validation metric must make to count as one.
        min_scale: floor of an adapted scale.
        applied_by_optimizer: the loop applies the scales as per-encoder learning rates
            (param groups); the balancer does not touch gradients.
        criterion, metric, accumulation_steps, process_group: as for every balancer.
    """

    name = "mslr"

    def __init__(
        self,
        modalities: Sequence[Modality],
        *,
        scales: Mapping[str, float] | None = None,
        decay: float = 0.5,
        min_delta: float = 0.0,
        min_scale: float = 1e-3,
        applied_by_optimizer: bool = False,
        **common: Unpack[CommonOptions],
    ) -> None:
        super().__init__(modalities, **common)
        scales = dict(scales or {})
        unknown = sorted(set(scales) - set(self.modality_names))
        if unknown:
            raise ConfigurationError(
                f"mslr scales name unknown modalities {unknown}; registered: {list(self.modality_names)}"
            )
        values = [float(scales.get(n, 1.0)) for n in self.modality_names]
        if any(not v > 0 for v in values):
            raise ConfigurationError(f"mslr scales must be > 0, got {dict(zip(self.modality_names, values))}")
        if not 0 < decay <= 1 or min_scale <= 0 or min_delta < 0:
            raise ConfigurationError("mslr needs 0 < decay <= 1, min_scale > 0 and min_delta >= 0")
        self.decay, self.min_delta, self.min_scale = float(decay), float(min_delta), float(min_scale)
        self.applied_by_optimizer = bool(applied_by_optimizer)
        m = len(modalities)
        self.register_buffer("scales", torch.tensor(values, dtype=torch.float32))
        self.register_buffer("best_metric", torch.full((m,), float("-inf"), dtype=torch.float64))

    def scale_of(self, name: str) -> float:
        return float(self.scales[self.modality_names.index(name)])

    def _group_scales(self) -> dict[str, float]:
        """:meth:`param_groups` gives each encoder ``lr = scale * lr`` (for Adam-type optimizers
        or weight decay; then build the balancer with scales at 1), applied by the loop or not."""
        return {name: self.scale_of(name) for name in self.modality_names}

    def update_from_validation(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Adapt the scales from each modality's validation metric (higher is better);
        returns the new scales."""
        missing = sorted(set(self.modality_names) - set(metrics))
        if missing:
            raise ConfigurationError(f"update_from_validation needs a metric for every modality; missing {missing}")
        for index, name in enumerate(self.modality_names):
            value = float(metrics[name])
            if value > float(self.best_metric[index]) + self.min_delta:
                self.best_metric[index] = value
            else:
                self.scales[index] = max(float(self.scales[index]) * self.decay, self.min_scale)
        return {n: self.scale_of(n) for n in self.modality_names}

    def on_validation(self, validation: Validation) -> dict[str, float] | None:
        """:meth:`update_from_validation` from each head's validation metric (a non-finite
        one counts as a stall); the untrained network (``epoch`` 0) sets no best."""
        if validation.epoch == 0:
            return None
        metrics = validation.head_metrics
        return self.update_from_validation({n: v if math.isfinite(v) else -math.inf for n, v in metrics.items()})

    def lr_scales(self) -> dict[str, float] | None:
        """The scales, when the loop applies them as per-encoder learning rates."""
        return {n: self.scale_of(n) for n in self.modality_names} if self.applied_by_optimizer else None

    def _modulate_gradients(self, telemetry: StepTelemetry) -> None:
        for index, name in enumerate(self.modality_names):
            scale = self.scales[index]
            if self.applied_by_optimizer or float(scale) == 1.0:
                continue
            for grad in self.encoder_grads(name):
                grad.mul_(scale.to(grad.dtype))
        telemetry.per_modality["scale"] = self.scales.clone()
