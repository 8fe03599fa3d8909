"""MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance
(Wei & Hu, ICML 2024), for M modalities.

The objective is the fused task loss plus one unimodal loss per modality,
``L = L_m + sum_i L_i``. In plain joint training the encoder ``theta_i`` of modality i
gets ``g_m + g_u`` with ``g_m = grad_{theta_i} L_m`` and ``g_u = grad_{theta_i} L_i``
(``L_i``: the loss of modality i's unimodal head). MMPareto replaces it, per encoder, by:

1. ``cos = cos(g_m, g_u)`` over the encoder's parameters flattened into one vector;
2. ``cos >= 0`` (no conflict): ``alpha_m = alpha_u = 1/2``;
   ``cos < 0`` (conflict): the min-norm (MGDA) point of the segment between the two,
   ``alpha_u = clip(((g_m - g_u) . g_m) / ||g_m - g_u||^2, 0, 1)``, ``alpha_m = 1 - alpha_u``;
3. ``g = 2 (alpha_m g_m + alpha_u g_u)``: with equal weights exactly ``g_m + g_u``;
4. magnitude (``rescale=True``): ``g <- g * max(1, ||g_m + g_u|| / ||g||)``. The min-norm
   point of two conflicting gradients is short; the paper keeps the Pareto direction but
   restores a large enough step (it argues the larger magnitude, with the stochastic noise
   it carries, helps generalization). This is the rule of the authors' released code as we
   know it (``new_grad = 2 a_u g_u + 2 a_m g_m``; if ``||g_m + g_u|| > ||new_grad||`` the new
   gradient is rescaled to that norm, otherwise kept), with two differences: we take the
   norms over the whole encoder (the vector the weights were computed from) rather than
   per parameter tensor, and we leave out the code's extra global factor ``gamma``
   (i.e. ``gamma = 1``; use the learning rate instead). NOTE: recalled, not re-read from
   the paper or the code in this project (no network); see ``docs/baselines_gradient.md``.

How the gradients are obtained in this interface:

* ``g_u``: the base class trains the heads on *detached* features, so no unimodal
  gradient reaches the encoders in backward. In :meth:`extra_loss`, MMPareto runs each head
  once more on the *non-detached* features and takes
  ``torch.autograd.grad(L_i, encoder_i params, retain_graph=True)`` (into the encoder only;
  the head's own gradient still comes from the detached copy, which is the same). One extra
  head forward and one extra backward through each encoder per micro-batch. Heads with
  dropout see two different masks in the two forwards.
* ``g_m``: the encoder's ``.grad`` as backward left it, i.e. the gradient of the fused task
  loss (the balancer adds nothing else that reaches the encoders). With gradient
  accumulation ``.grad`` is whatever the loop accumulated; ``g_u`` is the *mean* over the
  step's micro-batches, which matches a loop that divides each micro-batch loss by
  ``accumulation_steps`` (the usual convention; with one micro-batch nothing is assumed).
* torch.distributed: ``.grad`` is already averaged by DDP before :meth:`modulate`; the
  stored ``g_u`` is averaged over ranks there too, so every rank computes the same update.
* AMP: call ``modulate`` after ``GradScaler.unscale_``; ``g_u`` comes from the unscaled
  head loss, so both are in the same units.

The weights are computed per encoder; each modality's unimodal loss only enters its own
encoder (in late fusion it has no gradient anywhere else). Heads are required. No
running state besides the heads: resume needs only ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from multimodal_general.balance.base import Balancer, CommonOptions, Unpack
from multimodal_general.balance.distributed import is_distributed
from multimodal_general.balance.registration import Modality
from multimodal_general.balance.telemetry import StepTelemetry
from multimodal_general.errors import RegistrationError


def pareto_weights(g_m: Tensor, g_u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(cos, alpha_m, alpha_u)`` for two flat gradient vectors (0-d tensors, float64).

    Equal weights when ``cos >= 0`` (a zero vector counts as no conflict); otherwise the
    min-norm convex combination ``argmin_{a in [0,1]} ||(1 - a) g_m + a g_u||``.
    """
    g_m, g_u = g_m.double(), g_u.double()
    norms = torch.linalg.vector_norm(g_m) * torch.linalg.vector_norm(g_u)
    dot = g_m @ g_u
    cos = torch.where(norms > 0, dot / norms.clamp_min(torch.finfo(torch.float64).tiny), dot.new_zeros(()))
    diff = g_m - g_u
    denominator = diff @ diff
    mgda = ((diff @ g_m) / denominator.clamp_min(torch.finfo(torch.float64).tiny)).clamp(0, 1)
    alpha_u = torch.where(cos < 0, mgda, torch.full_like(mgda, 0.5))
    return cos, 1 - alpha_u, alpha_u


def pareto_combine(g_m: Tensor, g_u: Tensor, *, rescale: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """MMPareto's gradient for one encoder from flat ``g_m`` and ``g_u``.

    Returns ``g`` (dtype of ``g_m``) and ``{"cos", "alpha_m", "alpha_u", "scale"}``, where
    ``scale`` is the magnitude factor applied to ``2 (alpha_m g_m + alpha_u g_u)``.
    """
    cos, alpha_m, alpha_u = pareto_weights(g_m, g_u)
    combined = 2 * (alpha_m * g_m.double() + alpha_u * g_u.double())
    scale = combined.new_ones(())
    if rescale:
        target = torch.linalg.vector_norm(g_m.double() + g_u.double())
        norm = torch.linalg.vector_norm(combined)
        scale = torch.where(norm > 0, (target / norm.clamp_min(torch.finfo(torch.float64).tiny)).clamp_min(1), scale)
    info = {"cos": cos, "alpha_m": alpha_m, "alpha_u": alpha_u, "scale": scale}
    return (combined * scale).to(g_m.dtype), info


class MMPareto(Balancer):
    """MMPareto: per encoder, Pareto integration of the fused and the unimodal gradient.

    Args:
        modalities: two or more, each with encoder, head and head_last_layer.
        criterion: the task loss, used for the fused output and for every head.
        metric: the heads' utilization metric (telemetry ``eps``).
        rescale: restore the magnitude ``||g_m + g_u||`` when the combined gradient is
            shorter (the paper's magnitude rule); ``False``: plain ``2 (a_m g_m + a_u g_u)``.
    """

    name = "mmpareto"
    requires_heads = True
    min_modalities = 2

    def __init__(
        self,
        modalities: Sequence[Modality],
        *,
        rescale: bool = True,
        **common: Unpack[CommonOptions],
    ) -> None:
        super().__init__(modalities, **common)
        self.rescale = bool(rescale)
        m = len(modalities)
        self.register_buffer("cosines", torch.zeros(m))
        self.register_buffer("alpha_u", torch.full((m,), 0.5))
        self.register_buffer("scales", torch.ones(m))
        # sum over the step's micro-batches of grad_{theta_i} L_i, per encoder parameter
        self._unimodal_grads: dict[str, list[Tensor | None]] = {}

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "rescale": self.rescale}

    # ------------------------------------------------------------- g_u
    def _balance_loss(self, features, output, target, task_loss) -> Tensor:
        for name in self.modality_names:
            if name not in features:
                raise RegistrationError(f"features has no entry for modality '{name}'")
            params = self._encoder_params[name]
            loss = self.criterion(self.heads[name](features[name]), target)
            if not loss.requires_grad:
                raise RegistrationError(
                    f"the features of modality '{name}' carry no graph: MMPareto needs the "
                    "unimodal loss's gradient with respect to the encoder"
                )
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            stored = self._unimodal_grads.get(name)
            if stored is None:
                self._unimodal_grads[name] = [None if g is None else g.detach() for g in grads]
            else:
                for index, g in enumerate(grads):
                    if g is not None:
                        stored[index] = g.detach() if stored[index] is None else stored[index] + g
        return task_loss.new_zeros(())

    def _step_unimodal_grads(self, name: str) -> list[Tensor]:
        """``g_u`` per parameter: mean over micro-batches, averaged over ranks."""
        params = self._encoder_params[name]
        stored = self._unimodal_grads.get(name) or [None] * len(params)
        grads = [torch.zeros_like(p) if g is None else g / self._micro_batches for p, g in zip(params, stored)]
        if is_distributed(self.process_group):
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
            flat /= dist.get_world_size(self.process_group)
            grads = [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in params]), params)]
        return grads

    # ------------------------------------------------------------ combine
    def _modulate_gradients(self, telemetry: StepTelemetry) -> None:
        for index, name in enumerate(self.modality_names):
            params = self._encoder_params[name]
            g_u = self._step_unimodal_grads(name)
            g_m = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
            flat_m = torch.cat([g.reshape(-1) for g in g_m])
            flat_u = torch.cat([g.reshape(-1).to(flat_m.dtype) for g in g_u])
            combined, info = pareto_combine(flat_m, flat_u, rescale=self.rescale)
            for param, chunk in zip(params, combined.split([p.numel() for p in params])):
                chunk = chunk.view_as(param)
                if param.grad is None:
                    if chunk.any():
                        param.grad = chunk.to(param.dtype).clone()
                else:
                    param.grad.copy_(chunk)
            self.cosines[index] = info["cos"].float()
            self.alpha_u[index] = info["alpha_u"].float()
            self.scales[index] = info["scale"].float()
        self._unimodal_grads = {}
        telemetry.per_modality["cos"] = self.cosines.clone()
        telemetry.per_modality["alpha_u"] = self.alpha_u.clone()
        telemetry.per_modality["scale"] = self.scales.clone()
