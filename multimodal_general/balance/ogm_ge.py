"""OGM-GE: On-the-fly Gradient Modulation with Generalization Enhancement
(Peng, Wei, Deng, Wang, Hu; CVPR 2022), generalized to M modalities.

Per optimizer step:

1. for a late-fusion linear head ``y = W [h_1; ...; h_M] + b`` the contribution of
   modality i is ``W_i h_i + b / M`` (``W_i``: the columns of ``W`` that read ``h_i``);
2. ``s_i``: the mean softmax probability of the true class under that contribution, over
   every sample of the step (all micro-batches, all ranks);
3. ``ratio_i = s_i / mean_{j != i} s_j`` (for M = 2 the paper's ``s_1 / s_2``);
4. ``k_i = 1 - tanh(alpha * (ratio_i - 1))`` if ``ratio_i > 1``, else ``1``;
5. every gradient of encoder i is multiplied by ``k_i``;
6. GE: for each modality with ``k_i < 1``, each of its encoder's gradient tensors ``g``
   gets Gaussian noise ``N(0, std(g)^2)`` (std of the gradient before scaling, per tensor).

What differs from the authors' code (see ``docs/baselines.md``): M modalities (each
against the mean of the others); ``tanh(alpha * (ratio - 1))``, continuous at ratio 1, as
the issue specifies, where the released code is commonly reproduced as
``tanh(alpha * ratio)``; noise only on the modulated (dominant) modalities and on every
encoder tensor, not only on 4-D convolution weights; scores averaged over the step rather
than summed over one batch (the ratio is the same).

The noise is drawn from a generator seeded by ``(noise_seed, step_count)``: a resumed run
draws the same noise as an uninterrupted one, and every rank of a distributed run draws
the same noise (after DDP's all-reduce the gradients are identical, so replicas stay equal).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from multimodal_general.balance.base import Balancer, CommonOptions, Unpack, check_classification
from multimodal_general.balance.distributed import all_reduce_sum
from multimodal_general.balance.registration import Modality
from multimodal_general.balance.telemetry import StepTelemetry
from multimodal_general.errors import ConfigurationError, RegistrationError


def ogm_coefficients(scores: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """``(ratio, k)`` from per-modality scores: each modality against the mean of the others."""
    m = scores.numel()
    others = (scores.sum() - scores) / (m - 1)
    ratio = scores / others.clamp_min(torch.finfo(scores.dtype).tiny)
    k = torch.where(ratio > 1, 1 - torch.tanh(alpha * (ratio - 1)), torch.ones_like(ratio))
    return ratio, k


class OGMGE(Balancer):
    """OGM-GE: scale the dominant modality's encoder gradients by 1 - tanh(alpha (ratio - 1)), plus noise.

    Args:
        modalities: two or more (heads optional; if registered they are trained and reported).
        fused_last_layer: the ``nn.Linear`` that reads the concatenated features
            ``[h_1; ...; h_M]``, in the registration order of ``modalities``.
        criterion: the task loss (needed only when heads are registered).
        metric: the heads' utilization metric (telemetry only).
        alpha: strength of the modulation (default 0.1).
        ge: add the Gaussian noise of Generalization Enhancement.
        noise_seed: seed of the GE noise (combined with the step count).
    """

    name = "ogm_ge"
    min_modalities = 2

    def __init__(
        self,
        modalities: Sequence[Modality],
        *,
        fused_last_layer: nn.Module,
        alpha: float = 0.1,
        ge: bool = True,
        noise_seed: int = 0,
        **common: Unpack[CommonOptions],
    ) -> None:
        super().__init__(modalities, **common)
        if not isinstance(fused_last_layer, nn.Linear):
            raise ConfigurationError(
                "ogm_ge needs fused_last_layer to be the nn.Linear that reads the concatenated "
                f"modality features (late fusion), got {type(fused_last_layer).__name__}"
            )
        for modality in modalities:
            if any(fused_last_layer.weight is p for p in modality.encoder.parameters()):
                raise RegistrationError(
                    f"fused_last_layer is inside the encoder of '{modality.name}'; it must be the "
                    "fused head's linear layer over the concatenated features"
                )
        if alpha < 0:
            raise ConfigurationError(f"ogm_ge needs alpha >= 0, got {alpha}")
        self._fused = (fused_last_layer,)  # a tuple: the layer belongs to the user's model
        self.alpha, self.ge, self.noise_seed = float(alpha), bool(ge), int(noise_seed)
        m = len(modalities)
        self.register_buffer("_true_sum", torch.zeros(m, dtype=torch.float64), persistent=False)
        self.register_buffer("_true_count", torch.zeros(m, dtype=torch.float64), persistent=False)
        self.register_buffer("scores", torch.zeros(m))
        self.register_buffer("ratios", torch.ones(m))
        self.register_buffer("coefficients", torch.ones(m))

    @property
    def fused_layer(self) -> nn.Linear:
        return self._fused[0]

    # ------------------------------------------------------------------ scores
    def contributions(self, features) -> dict[str, Tensor]:
        """Each modality's share ``W_i h_i + b / M`` of the fused logits (detached)."""
        layer = self.fused_layer
        dims = []
        for name in self.modality_names:
            if name not in features:
                raise RegistrationError(f"features has no entry for modality '{name}'")
            h = features[name]
            if h.dim() != 2:
                raise ConfigurationError(
                    f"ogm_ge needs flat features [N, d] per modality (late fusion by concatenation); "
                    f"'{name}' has shape {tuple(h.shape)}"
                )
            dims.append(h.shape[1])
        if sum(dims) != layer.in_features:
            raise ConfigurationError(
                f"ogm_ge: fused_last_layer reads {layer.in_features} inputs, but the modality features "
                f"have {dims} (sum {sum(dims)}): it must be the linear layer over the concatenated "
                "features [h_1; ...; h_M], in registration order"
            )
        weight = layer.weight.detach()
        bias = None if layer.bias is None else layer.bias.detach() / len(dims)
        out, offset = {}, 0
        for name, d in zip(self.modality_names, dims):
            logits = features[name].detach() @ weight[:, offset : offset + d].T
            out[name] = logits if bias is None else logits + bias
            offset += d
        return out

    def _balance_loss(self, features, output, target, task_loss) -> Tensor:
        check_classification("ogm_ge supports classification tasks", output, target)
        with torch.no_grad():
            for index, logits in enumerate(self.contributions(features).values()):
                p = logits.float().softmax(dim=1).gather(1, target.view(-1, 1))
                self._true_sum[index] += p.sum().double()
                self._true_count[index] += p.numel()
        return task_loss.new_zeros(())

    # -------------------------------------------------------------- modulation
    def _noise_generator(self, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed((self.noise_seed * 1_000_003 + int(self.step_count)) % (2**63 - 1))
        return generator

    def _modulate_gradients(self, telemetry: StepTelemetry) -> None:
        stats = torch.cat([self._true_sum, self._true_count])
        all_reduce_sum(stats, self.process_group)
        sums, counts = stats.chunk(2)
        scores = (sums / counts.clamp_min(1)).float()
        ratios, k = ogm_coefficients(scores, self.alpha)
        self.scores.copy_(scores)
        self.ratios.copy_(ratios)
        self.coefficients.copy_(k)
        generators: dict[torch.device, torch.Generator] = {}
        for index, name in enumerate(self.modality_names):
            coefficient = float(k[index])
            if coefficient >= 1:
                continue
            for grad in self.encoder_grads(name):
                std = grad.std() if grad.numel() > 1 else grad.new_zeros(())
                grad.mul_(coefficient)
                if self.ge:
                    generator = generators.get(grad.device)
                    if generator is None:
                        generator = generators[grad.device] = self._noise_generator(grad.device)
                    noise = torch.randn(grad.shape, generator=generator, device=grad.device, dtype=grad.dtype)
                    grad.add_(noise * std)
        self._true_sum.zero_()
        self._true_count.zero_()
        telemetry.per_modality["score"] = self.scores.clone()
        telemetry.per_modality["ratio"] = self.ratios.clone()
        telemetry.per_modality["coef"] = self.coefficients.clone()
