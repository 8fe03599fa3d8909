"""G-Blending: Gradient-Blending (Wang, Tran & Feiszli, "What Makes Training Multi-modal
Classification Networks Hard?", CVPR 2020), for M modalities.

The objective blends the fused loss with one unimodal loss per modality,
``L = w_fused L_fused + sum_i w_i L_i``, where ``L_i`` is modality i's head loss on the
*non-detached* features (so it trains encoder i too). The weights are re-estimated every
"super-epoch" from each head's overfitting-to-generalization ratio: for head k (the fused
one and each unimodal one), with train loss ``T`` and held-out loss ``V`` measured at the
start (n) and the end (n + D) of the super-epoch,

* generalization gain ``dG = V_n - V_{n+D}``, clipped at 0;
* overfitting ``O = V - T`` and its change ``dO = O_{n+D} - O_n``;
* ``w_k = (dG / max(dO^2, epsilon)) / Z`` with ``Z`` making the weights sum to 1.

When no head gained (every ``dG`` is 0, or a loss is not finite) the weights are kept.

How it maps onto the loop contract (``loss = task_loss + extra_loss(...)``):
:meth:`_balance_loss` returns ``(w_fused - 1) * task_loss + sum_i w_i L_i``, so the loop's
total is the blended loss (plus the base class's head losses on detached features, which
train the heads with weight 1 as for every other balancer). In ``w_i L_i`` the head runs
with its parameters detached: that term's gradient reaches encoder i only, so a head is
trained exactly as under joint training and its weight acts on the encoder.

The weights start uniform (``1 / (M + 1)`` each) and live in the ``weights`` buffer
(order: fused, then the modalities); ``state_dict`` resumes them. Measuring the train and
held-out losses is the loop's job: it passes them to :meth:`GBlending.on_validation` after
every validation (as ``Validation.losses``). The first measurement is kept; at each later
validation at least ``super_epoch`` epochs after the kept one, the weights are re-estimated
from the two (:meth:`GBlending.update_from_losses`) and the new measurement is kept. The kept
measurement (``measured_epoch``, ``measured_losses``) is part of ``state_dict``, so a resumed
run updates as an uninterrupted one; a state saved before it existed loads as "nothing kept".
A loop that also measures the untrained network passes it as epoch 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torch.func import functional_call

from multimodal_general.balance.base import Balancer, CommonOptions, Unpack, Validation
from multimodal_general.balance.registration import Modality
from multimodal_general.balance.telemetry import StepTelemetry
from multimodal_general.errors import ConfigurationError, RegistrationError

FUSED = "fused"


def blending_weights(
    start: Mapping[str, tuple[float, float]],
    end: Mapping[str, tuple[float, float]],
    keys: Sequence[str],
    epsilon: float = 1e-6,
) -> list[float] | None:
    """G-Blending weights for ``keys`` from ``{key: (train_loss, val_loss)}`` at the start
    and the end of a super-epoch; ``None`` when no head gained (keep the old weights)."""
    raw = []
    for key in keys:
        (t0, v0), (t1, v1) = (float(x) for x in start[key]), (float(x) for x in end[key])
        gain = max(v0 - v1, 0.0)
        overfit_change = (v1 - t1) - (v0 - t0)
        value = gain / max(overfit_change**2, epsilon)
        raw.append(value if math.isfinite(value) else 0.0)
    total = sum(raw)
    if not total > 0 or not math.isfinite(total):
        return None
    return [r / total for r in raw]


class GBlending(Balancer):
    """G-Blending: per-head loss weights from the overfitting-to-generalization ratio on a held-out split.

    Args:
        modalities: one or more, each with encoder and head.
        criterion: the task loss, used for the fused output and for every head.
        metric: the heads' utilization metric (telemetry ``eps``).
        super_epoch: epochs between weight updates (at least; see :meth:`on_validation`).
        epsilon: floor of ``dO^2`` in the weight rule.
    """

    name = "gblending"
    requires_heads = True
    min_modalities = 1

    def __init__(
        self,
        modalities: Sequence[Modality],
        *,
        super_epoch: int = 2,
        epsilon: float = 1e-6,
        **common: Unpack[CommonOptions],
    ) -> None:
        super().__init__(modalities, **common)
        if int(super_epoch) < 1 or not epsilon > 0:
            raise ConfigurationError("gblending needs super_epoch >= 1 and epsilon > 0")
        self.super_epoch, self.epsilon = int(super_epoch), float(epsilon)
        m = len(modalities)
        self.register_buffer("weights", torch.full((m + 1,), 1.0 / (m + 1)))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        # the measurement kept for the next update: its epoch (-1: none) and, per head (the
        # order of ``keys``), its (train loss, validation loss)
        self.register_buffer("measured_epoch", torch.full((), -1, dtype=torch.long))
        self.register_buffer("measured_losses", torch.zeros((m + 1, 2), dtype=torch.float64))

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "super_epoch": self.super_epoch, "epsilon": self.epsilon}

    @property
    def keys(self) -> tuple[str, ...]:
        """The heads, in the order of ``weights``: ``"fused"`` then the modalities."""
        return (FUSED, *self.modality_names)

    def weight_of(self, key: str) -> float:
        return float(self.weights[self.keys.index(key)])

    def update_from_losses(
        self,
        start: Mapping[str, tuple[float, float]],
        end: Mapping[str, tuple[float, float]],
    ) -> dict[str, float]:
        """Re-estimate the weights from ``{head: (train_loss, val_loss)}`` measured at the
        start and at the end of a super-epoch (heads: ``"fused"`` and every modality);
        returns the new weights."""
        missing = sorted((set(self.keys) - set(start)) | (set(self.keys) - set(end)))
        if missing:
            raise ConfigurationError(f"update_from_losses needs losses for every head; missing {missing}")
        weights = blending_weights(start, end, self.keys, self.epsilon)
        if weights is not None:
            self.weights.copy_(torch.tensor(weights, dtype=self.weights.dtype))
        self.updates += 1
        return {k: self.weight_of(k) for k in self.keys}

    def on_validation(self, validation: Validation) -> dict[str, float] | None:
        """Keep the first measurement; at a validation ``super_epoch`` or more epochs after
        the kept one, update the weights from the two and keep the new one. Returns the
        new weights after an update, else ``None``."""
        last = int(self.measured_epoch)
        if last >= 0 and validation.epoch - last < self.super_epoch:
            return None
        losses = validation.losses
        weights = self.update_from_losses(self.measurement(), losses) if last >= 0 else None
        self.keep_measurement(validation.epoch, losses)
        return weights

    def measurement(self) -> dict[str, tuple[float, float]] | None:
        """The kept measurement ``{head: (train_loss, val_loss)}``, or ``None``."""
        if int(self.measured_epoch) < 0:
            return None
        return {key: (float(t), float(v)) for key, (t, v) in zip(self.keys, self.measured_losses.tolist())}

    def keep_measurement(self, epoch: int, losses: Mapping[str, tuple[float, float]]) -> None:
        """Keep ``{head: (train_loss, val_loss)}`` measured after ``epoch`` epochs (also: restore
        one kept outside the balancer, e.g. in an older checkpoint)."""
        missing = sorted(set(self.keys) - set(losses))
        if missing:
            raise ConfigurationError(f"a G-Blending measurement needs losses for every head; missing {missing}")
        values = [[float(x) for x in losses[key]] for key in self.keys]
        self.measured_losses.copy_(torch.tensor(values, dtype=torch.float64))
        self.measured_epoch.fill_(int(epoch))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # a state saved before the kept measurement was part of it: nothing kept
        for key in ("measured_epoch", "measured_losses"):
            if prefix + key not in state_dict:
                default = torch.full_like(getattr(self, key), -1 if key == "measured_epoch" else 0)
                state_dict[prefix + key] = default
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _balance_loss(self, features, output, target, task_loss) -> Tensor:
        loss = (self.weights[0].to(task_loss.dtype) - 1) * task_loss
        for index, name in enumerate(self.modality_names, start=1):
            if name not in features:
                raise RegistrationError(f"features has no entry for modality '{name}'")
            head = self.heads[name]
            frozen = {k: p.detach() for k, p in head.named_parameters()}
            prediction = functional_call(head, frozen, (features[name],))
            loss = loss + self.weights[index].to(task_loss.dtype) * self.criterion(prediction, target)
        return loss

    def _modulate_gradients(self, telemetry: StepTelemetry) -> None:
        telemetry.per_modality["weight"] = self.weights[1:].clone()
        telemetry.scalars["weight_fused"] = self.weights[0].clone()
