"""CGGM: Classifier-Guided Gradient Modulation (Guo et al., NeurIPS 2024).

Per optimizer step (see ``shared/CGGM.md`` and ``docs/cggm.md``):

1. unimodal heads predict the target from detached encoder features;
2. ``eps_i``: each head's utilization metric on the step's batch;
3. ``d_i``: its improvement;
4. ``B_i = rho * (sum_{k != i} d_k) / (sum_k d_k)``;
5. magnitude: every gradient of encoder ``i`` is multiplied by ``B_i``;
6. direction: ``L_gm = (1/M) * sum_i (|B_i| - B_i * cos(g_F, g_i))`` is added to the loss
   with weight ``lam``.

The presets differ as documented on :data:`CGGM_PRESETS`; ``paper``, ``official`` and ``stable``
follow the paper's rule (step 4), ``deficit`` is a variant of ours that replaces it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multimodal_general.balance.base import Balancer, CommonOptions, Unpack
from multimodal_general.balance.coefficients import (
    deficit_coefficients,
    ema_update,
    level,
    paper_coefficients,
    stable_coefficients,
    trend,
)
from multimodal_general.balance.registration import (
    Modality,
    last_weight,
    validate_fused_last_layer,
)
from multimodal_general.balance.telemetry import StepTelemetry
from multimodal_general.errors import ConfigurationError


#: how CGGM's coefficients act on an encoder (``scale_by``)
SCALE_BY = ("gradient", "learning_rate")


@dataclass(frozen=True)
class CGGMPreset:
    """How one variant of CGGM computes ``d``, ``B`` and ``L_gm``."""

    name: str
    cosine_of: Literal["gradients", "weights"]
    """``gradients``: cos of the last layers' gradients, ``g_F`` built with
    ``create_graph=True`` so ``L_gm`` has a real gradient; ``weights``: cos of their weights."""
    lagged_direction: bool
    """``L_gm`` computed at step t (value and gradient) is added to the loss of step t+1."""
    rho_in_direction: bool
    """Whether ``L_gm`` uses ``B`` (with rho) or ``B / rho``."""
    guarded: bool
    """Smoothed improvements and coefficients in ``[0, rho]``; no usable signal → B = 1."""
    summary: str
    drive: Literal["improvement", "deficit"] = "improvement"
    """What ``B`` is computed from: each head's improvement ``d`` (the paper), or (a variant
    of ours, not the paper's) its remaining deficit ``1 - eps`` (smoothed), so that the
    weakest head's encoder gets the most gradient (:func:`deficit_coefficients`)."""


#: rho where a run does not set it: the paper's 1.2 (its range is 1.2-1.3). The BraTS trainer's
#: configuration sets 1.0 (``balancer.rho``), the value its runs and shipped models were trained with.
DEFAULT_RHO = 1.2

CGGM_PRESETS: dict[str, CGGMPreset] = {
    preset.name: preset
    for preset in (
        CGGMPreset(
            "paper", "gradients", False, True, False,
            "the published equations, computed in the same iteration",
        ),
        CGGMPreset(
            "official", "weights", True, False, False,
            "what the authors' code does: weight cosine, one-step lag, no rho in L_gm",
        ),
        CGGMPreset(
            "stable", "gradients", False, True, True,
            "paper semantics with EMA-smoothed improvements and guarded B in [0, rho]",
        ),
        CGGMPreset(
            "deficit", "gradients", False, True, True,
            "not the paper's rule: B from each head's smoothed deficit 1 - eps (mean B = rho), "
            "so the weakest head's encoder gets the most gradient",
            drive="deficit",
        ),
    )
}


def check_cggm_settings(preset: str, rho: float, lam: float) -> None:
    """A known preset, ``rho > 0`` and ``lam >= 0``, or a one-line :class:`ConfigurationError`."""
    if preset not in CGGM_PRESETS:
        raise ConfigurationError(f"unknown CGGM preset '{preset}'; choose one of {sorted(CGGM_PRESETS)}")
    if rho <= 0 or lam < 0:
        raise ConfigurationError(f"CGGM needs rho > 0 and lam >= 0; got rho={rho}, lam={lam}")


class CGGM(Balancer):
    """Classifier-guided gradient modulation for any number of modalities and any task.

    Args:
        modalities: two or more, each with encoder, head and head_last_layer.
        fused_last_layer: the last layer of the fused prediction head (or its weight).
        criterion: the task loss; trains the heads and defines ``g_F`` and ``g_i``.
        metric: the heads' utilization metric (``accuracy``, ``binary_accuracy``,
            ``neg_mae``, ``soft_dice``, ``hard_dice`` or a callable).
        preset: ``paper``, ``official``, ``stable`` or ``deficit`` (see :data:`CGGM_PRESETS`).
        rho: scale of the coefficients (see :data:`DEFAULT_RHO`).
        lam: weight of the direction loss ``L_gm`` (paper: 0.05-0.2).
        fast_beta, slow_beta: EMA factors of the ``stable`` trend estimate of ``d``.
        min_signal: ``stable`` leaves gradients untouched when ``sum max(d, 0)`` is below it.
        scale_by: how ``B_i`` acts on encoder i: ``gradient`` (the paper's: its gradients are
            multiplied by ``B_i``) or ``learning_rate`` (gradients left alone; the loop sets the
            encoder's rate to ``B_i`` times the base rate from :meth:`lr_scales`, before each
            optimizer step). Under Adam/AdamW a gradient scale that changes slowly is normalised
            away per parameter, a learning rate is not; under plain SGD without momentum or
            weight decay the two are the same step.
    """

    name = "cggm"
    requires_heads = True
    min_modalities = 2

    def __init__(
        self,
        modalities: Sequence[Modality],
        *,
        fused_last_layer: nn.Module | nn.Parameter,
        preset: str = "stable",
        rho: float = DEFAULT_RHO,
        lam: float = 0.1,
        fast_beta: float = 0.9,
        slow_beta: float = 0.99,
        min_signal: float = 1e-6,
        scale_by: str = "gradient",
        **common: Unpack[CommonOptions],
    ) -> None:
        super().__init__(modalities, **common)
        check_cggm_settings(preset, rho, lam)
        if not 0 <= fast_beta < slow_beta < 1:
            raise ConfigurationError("CGGM needs 0 <= fast_beta < slow_beta < 1")
        if scale_by not in SCALE_BY:
            raise ConfigurationError(f"CGGM's scale_by must be one of {', '.join(SCALE_BY)}; got '{scale_by}'")
        self.scale_by = scale_by
        self._rates_taken = True  # learning_rate mode: the loop read lr_scales() since the last step
        self.preset = CGGM_PRESETS[preset]
        self.rho, self.lam = float(rho), float(lam)
        self.fast_beta, self.slow_beta, self.min_signal = fast_beta, slow_beta, min_signal
        fused = validate_fused_last_layer(modalities, fused_last_layer)
        self._fused_weight = (fused,)  # a tuple, so the module does not register it
        self._head_weights = {
            m.name: last_weight(m.head_last_layer, f"head_last_layer of '{m.name}'")
            for m in modalities
        }
        m = len(modalities)
        self.register_buffer("previous_eps", torch.zeros(m))
        # float64: the trend is a small difference of two averages
        self.register_buffer("ema_fast", torch.zeros(m, dtype=torch.float64))
        self.register_buffer("ema_slow", torch.zeros(m, dtype=torch.float64))
        self.register_buffer("ema_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("coefficients", torch.ones(m))
        self.register_buffer("improvement", torch.zeros(m))
        self.register_buffer("coefficients_usable", torch.zeros((), dtype=torch.bool))
        self.register_buffer("coefficients_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("lag_value", torch.zeros(()))
        self.register_buffer("lag_grad", torch.zeros_like(fused, dtype=torch.float32))
        self.register_buffer("lag_ready", torch.zeros((), dtype=torch.bool))
        self._step_closed = False
        self._cosine: Tensor | None = None
        self._direction_loss: Tensor | None = None

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "preset": self.preset.name}

    @property
    def fused_weight(self) -> nn.Parameter:
        return self._fused_weight[0]

    # ----------------------------------------------------------- coefficients
    def _close_step(self) -> None:
        """Turn the step's utilization into ``d`` and ``B`` (once per optimizer step)."""
        if self._step_closed:
            return
        # a modality absent from the step's input keeps its last value: no change, no signal
        eps = torch.where(self.step_observed(), self.step_utilization(), self.previous_eps)
        if self.preset.guarded:
            self.ema_count += 1
            ema_update(self.ema_fast, eps.double(), self.fast_beta)
            ema_update(self.ema_slow, eps.double(), self.slow_beta)
            if self.preset.drive == "deficit":
                smoothed = level(self.ema_fast, self.ema_count, self.fast_beta).to(eps.dtype)
                coefficients, usable = deficit_coefficients(smoothed, self.rho, self.min_signal)
                d = (1 - smoothed).clamp_min(0)  # telemetry's d: the deficit B was computed from
            else:
                d = trend(self.ema_fast, self.ema_slow, self.ema_count, self.fast_beta, self.slow_beta)
                d = d.to(eps.dtype)
                coefficients, usable = stable_coefficients(d, self.rho, self.min_signal)
        else:
            d = eps - self.previous_eps
            coefficients, usable = paper_coefficients(d, self.rho), torch.ones((), dtype=torch.bool)
        self.previous_eps.copy_(eps)
        self.improvement.copy_(d)
        self.coefficients.copy_(coefficients)
        self.coefficients_usable.copy_(usable)
        self.coefficients_ready.fill_(True)
        self._step_closed = True

    def _direction_coefficients(self) -> Tensor:
        b = self.coefficients if self.preset.rho_in_direction else self.coefficients / self.rho
        return b * self.coefficients_usable

    # ---------------------------------------------------------------- L_gm
    def _balance_loss(self, features, output, target, task_loss) -> Tensor:
        if self.lam == 0:
            return task_loss.new_zeros(())
        if self.preset.lagged_direction:
            return self.lam * self._lagged_direction_loss().to(task_loss.dtype)
        if self.accumulation_steps == 1:
            self._close_step()  # this micro-batch is the whole step: B is known now
        if not bool(self.coefficients_ready):
            return task_loss.new_zeros(())
        return self.lam * self._gradient_direction_loss(task_loss)

    def _gradient_direction_loss(self, task_loss: Tensor) -> Tensor:
        """``L_gm`` from the cosines of ``g_F`` (differentiable) and the constant ``g_i``."""
        (g_fused,) = torch.autograd.grad(task_loss, self.fused_weight, create_graph=True)
        g_fused = g_fused.flatten().float()
        # the modalities whose heads ran on this micro-batch (an absent one has no g_i)
        present = [i for i, name in enumerate(self.modality_names) if name in self.head_losses]
        cosines = []
        for index in present:
            name = self.modality_names[index]
            (g_head,) = torch.autograd.grad(
                self.head_losses[name], self._head_weights[name], retain_graph=True
            )
            cosines.append(F.cosine_similarity(g_fused, g_head.flatten().float(), dim=0))
        if not cosines:
            return task_loss.new_zeros(())
        cosine = torch.stack(cosines)
        b = self._direction_coefficients()[present]
        loss = (b.abs() - b * cosine).mean()
        recorded = torch.full((len(self.modality_names),), torch.nan, device=cosine.device)
        recorded[present] = cosine.detach()
        self._cosine, self._direction_loss = recorded, loss.detach()
        return loss

    def _lagged_direction_loss(self) -> Tensor:
        """Step t-1's ``L_gm`` (value and gradient w.r.t. the fused weight), as a surrogate
        ``value + <grad, W_F - stop_grad(W_F)>`` whose value and gradient are exactly those."""
        if not bool(self.lag_ready):
            return self.lag_value.new_zeros(())
        w = self.fused_weight
        return self.lag_value + (self.lag_grad * (w - w.detach())).sum()

    def _record_weight_direction_loss(self) -> None:
        """``official``: ``L_gm`` from the cosines of the last layers' weights at this step."""
        with torch.enable_grad():
            w = self.fused_weight.detach().float().requires_grad_(True)
            cosine = torch.stack(
                [
                    F.cosine_similarity(w.flatten(), self._head_weights[n].detach().flatten().float(), dim=0)
                    for n in self.modality_names
                ]
            )
            b = self._direction_coefficients()
            loss = (b.abs() - b * cosine).mean()
            (grad,) = torch.autograd.grad(loss, w)
        self.lag_value.copy_(loss.detach())
        self.lag_grad.copy_(grad)
        self.lag_ready.fill_(True)
        self._cosine, self._direction_loss = cosine.detach(), loss.detach()

    # ------------------------------------------------------------- magnitude
    def lr_scales(self) -> dict[str, float] | None:
        """``{name: B_i}`` when ``scale_by`` is ``learning_rate`` (the loop makes them the
        encoders' learning-rate factors for this step), else ``None``."""
        if self.scale_by != "learning_rate":
            return None
        self._rates_taken = True
        return dict(zip(self.modality_names, self.coefficients.tolist()))

    def _modulate_gradients(self, telemetry: StepTelemetry) -> None:
        if self.scale_by == "learning_rate":
            if not self._rates_taken:
                raise ConfigurationError(
                    "CGGM with scale_by learning_rate needs a loop that applies its lr_scales() at every "
                    "step (balanced_step with base_lr); this one did not")
            self._rates_taken = False
        self._close_step()
        if self.scale_by == "gradient":  # else the loop applies B through lr_scales()
            for index, name in enumerate(self.modality_names):
                for grad in self.encoder_grads(name):
                    grad.mul_(self.coefficients[index].to(grad.dtype))
        if self.preset.lagged_direction:
            self._record_weight_direction_loss()
        telemetry.per_modality["d"] = self.improvement.clone()
        telemetry.per_modality["B"] = self.coefficients.clone()
        if self._cosine is not None:
            telemetry.per_modality["cos"] = self._cosine
            telemetry.scalars["L_gm"] = self._direction_loss
        self._step_closed = False
        self._cosine = self._direction_loss = None
