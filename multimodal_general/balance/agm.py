"""AGM: Adaptive Gradient Modulation (Li et al., ICCV 2023, "Boosting multi-modal model
performance with adaptive gradient modulation"), for M modalities: classification, segmentation.

Per optimizer step:

1. mono-modal responses: the fused output with only modality i switched on, from a
   user callable ``unimodal_output(features, keep) -> Tensor`` (on detached features,
   without gradient). For late fusion by concatenation, :func:`concat_unimodal_output`
   builds it from the fused head: the other modalities' features are set to zero;
2. ``score_i``: the mean softmax probability of the true class under that response
   (classification), or its soft Dice with the target masks (segmentation: sigmoid per region,
   Dice per sample averaged over regions), over every sample of the step (all micro-batches,
   all ranks);
3. running strength ``s_i <- momentum * s_i + (1 - momentum) * score_i`` (the first step
   sets ``s_i = score_i``); a persistent buffer, so ``state_dict`` resumes it exactly;
4. ``ratio_i = s_i / mean_j s_j``;
5. ``k_i = clamp(exp(alpha * (target_ratio - ratio_i)), min_coef, max_coef)`` with
   ``target_ratio = 1``: balanced modalities are left alone, a modality stronger than the
   average is slowed down (``k < 1``) and a weaker one sped up (``k > 1``);
6. every gradient of encoder i is multiplied by ``k_i``.

What differs from the paper and the authors' code (see ``docs/baselines_gradient.md``):
the paper's mono-modal response is a Shapley-style average of the modality's marginal
contributions over all subsets of the others and its score is a cross-entropy; its
"target" is the running (iteration-averaged) ratio, and the coefficients modulate the
gradient at the encoder output. Here, as the issue specifies: one "only i on" response,
true-class probability, an EMA strength, ``target_ratio = 1`` and encoder gradients
scaled after backward. These are recalled design points, not re-read from the paper here.

Segmentation (``task_kind="segmentation"``): the response is the fused network run with a
modality mask that keeps only modality ``keep`` (the BraTS trainer decodes the step's branch
feature pyramids again, ``brats_cggm.training.mono_modal``), and the score is its soft Dice, the
segmentation counterpart of the true-class probability. Regression is refused with a
:class:`ConfigurationError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from multimodal_general.balance.base import (
    Balancer,
    CommonOptions,
    Unpack,
    check_classification,
    detached,
)
from multimodal_general.balance.distributed import all_reduce_sum
from multimodal_general.balance.metrics import soft_dice
from multimodal_general.balance.registration import Modality
from multimodal_general.balance.telemetry import StepTelemetry
from multimodal_general.errors import ConfigurationError, RegistrationError

UnimodalOutput = Callable[[Mapping[str, Tensor], str], Tensor]
TASK_KINDS = ("classification", "segmentation")


def concat_unimodal_output(fused_head: nn.Module, order: Sequence[str]) -> UnimodalOutput:
    """``unimodal_output`` for late fusion by concatenation: ``fused_head([h_1; ...; h_M])``
    with every feature but ``keep``'s replaced by zeros (``order``: the concatenation order).

    For :class:`~multimodal_general.training.imbalance.LateFusionNet`:
    ``concat_unimodal_output(model.head, list(model.encoders))``. Zero is "off" for
    features that end in a ReLU, as there.
    """
    order = tuple(order)

    def unimodal_output(features: Mapping[str, Tensor], keep: str) -> Tensor:
        if keep not in order:
            raise RegistrationError(f"unknown modality '{keep}'; the fused head reads {list(order)}")
        parts = [features[n] if n == keep else torch.zeros_like(features[n]) for n in order]
        return fused_head(torch.cat(parts, dim=1))

    return unimodal_output


def agm_coefficients(
    strength: Tensor, alpha: float, *, target_ratio: float = 1.0, min_coef: float = 0.1, max_coef: float = 10.0
) -> tuple[Tensor, Tensor]:
    """``(ratio, k)``: ``ratio_i = s_i / mean_j s_j``, ``k_i = clamp(exp(alpha (target - ratio_i)))``."""
    ratio = strength / strength.mean().clamp_min(torch.finfo(strength.dtype).tiny)
    k = torch.exp(alpha * (target_ratio - ratio)).clamp(min_coef, max_coef)
    return ratio, k


class AGM(Balancer):
    """AGM: scale each encoder's gradients by ``exp(alpha (1 - s_i / mean_j s_j))``.

    Args:
        modalities: two or more (heads optional; if registered they are trained and reported).
        unimodal_output: ``(features, keep) -> output``: the fused output with only modality
            ``keep`` on (see :func:`concat_unimodal_output`). Called without gradient.
        criterion: the task loss (needed only when heads are registered).
        metric: the heads' utilization metric (telemetry only).
        task_kind: ``"classification"`` (output ``[N, C]``, class indices ``[N]``) or
            ``"segmentation"`` (region logits ``[N, R, *spatial]``, 0/1 masks of that shape);
            anything else is refused.
        alpha: strength of the modulation (default 0.1; the paper's value is not checked here).
        momentum: EMA factor of the running strength (default 0.9).
        min_coef, max_coef: the range the coefficients are clamped to (default 0.1 to 10).
    """

    name = "agm"
    min_modalities = 2

    def __init__(
        self,
        modalities: Sequence[Modality],
        *,
        unimodal_output: UnimodalOutput | None = None,
        task_kind: str = "classification",
        alpha: float = 0.1,
        momentum: float = 0.9,
        min_coef: float = 0.1,
        max_coef: float = 10.0,
        **common: Unpack[CommonOptions],
    ) -> None:
        super().__init__(modalities, **common)
        if unimodal_output is None:
            raise ConfigurationError(
                "agm needs unimodal_output(features, keep) -> the fused output with only modality "
                "'keep' on (for late fusion by concatenation: concat_unimodal_output(fused_head, order))"
            )
        if task_kind not in TASK_KINDS:
            raise ConfigurationError(
                f"agm supports classification and segmentation only (true-class probability or "
                f"Dice of mono-modal responses); got task_kind='{task_kind}'"
            )
        if not callable(unimodal_output):
            raise ConfigurationError("agm needs unimodal_output, a callable (features, keep) -> output")
        if alpha < 0 or not 0 <= momentum < 1 or not 0 < min_coef <= 1 <= max_coef:
            raise ConfigurationError(
                "agm needs alpha >= 0, 0 <= momentum < 1 and 0 < min_coef <= 1 <= max_coef; got "
                f"alpha={alpha}, momentum={momentum}, min_coef={min_coef}, max_coef={max_coef}"
            )
        self._unimodal_output = (unimodal_output,)  # a tuple: it may be a bound module method
        self.task_kind = task_kind
        self.alpha, self.momentum = float(alpha), float(momentum)
        self.min_coef, self.max_coef = float(min_coef), float(max_coef)
        m = len(modalities)
        self.register_buffer("_true_sum", torch.zeros(m, dtype=torch.float64), persistent=False)
        self.register_buffer("_true_count", torch.zeros(m, dtype=torch.float64), persistent=False)
        self.register_buffer("scores", torch.zeros(m))
        self.register_buffer("strength", torch.zeros(m))
        self.register_buffer("strength_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("ratios", torch.ones(m))
        self.register_buffer("coefficients", torch.ones(m))

    @property
    def unimodal_output(self) -> UnimodalOutput:
        return self._unimodal_output[0]

    # ------------------------------------------------------------------ scores
    def _balance_loss(self, features, output, target, task_loss) -> Tensor:
        self._check_task(output, target)
        missing = [n for n in self.modality_names if n not in features]
        if missing:
            raise RegistrationError(f"features has no entry for modality(ies) {missing}")
        without_graph = {name: detached(h) for name, h in features.items()}
        with torch.no_grad():
            for index, name in enumerate(self.modality_names):
                response = self.unimodal_output(without_graph, name)
                if response.shape != output.shape:
                    raise RegistrationError(
                        f"unimodal_output(features, '{name}') has shape {tuple(response.shape)}, "
                        f"the fused output {tuple(output.shape)}"
                    )
                score = self._response_score(response, target)
                self._true_sum[index] += score.sum().double()
                self._true_count[index] += score.numel()
        return task_loss.new_zeros(())

    def _check_task(self, output: Tensor, target: Tensor) -> None:
        if self.task_kind == "segmentation":
            if output.dim() < 3 or target.shape != output.shape:
                raise ConfigurationError(
                    "agm with task_kind='segmentation' needs region logits [N, R, *spatial] and "
                    f"target masks of the same shape, got output {tuple(output.shape)} and target "
                    f"{tuple(target.shape)}"
                )
        else:
            check_classification("agm with task_kind='classification' expects a classification task", output, target, 2)

    def _response_score(self, response: Tensor, target: Tensor) -> Tensor:
        """One score per sample of a mono-modal response: its soft Dice (segmentation) or the
        softmax probability of the true class (classification)."""
        if self.task_kind == "segmentation":
            return soft_dice(response, target)
        return response.float().softmax(dim=1).gather(1, target.view(-1, 1))[:, 0]

    # -------------------------------------------------------------- modulation
    def _modulate_gradients(self, telemetry: StepTelemetry) -> None:
        stats = torch.cat([self._true_sum, self._true_count])
        all_reduce_sum(stats, self.process_group)
        sums, counts = stats.chunk(2)
        scores = (sums / counts.clamp_min(1)).float()
        self.scores.copy_(scores)
        updated = self.momentum * self.strength + (1 - self.momentum) * scores
        self.strength.copy_(torch.where(self.strength_ready, updated, scores))
        self.strength_ready.fill_(True)
        ratios, k = agm_coefficients(
            self.strength, self.alpha, min_coef=self.min_coef, max_coef=self.max_coef
        )
        self.ratios.copy_(ratios)
        self.coefficients.copy_(k)
        for index, name in enumerate(self.modality_names):
            for grad in self.encoder_grads(name):
                grad.mul_(k[index].to(grad.dtype))
        self._true_sum.zero_()
        self._true_count.zero_()
        telemetry.per_modality["score"] = self.scores.clone()
        telemetry.per_modality["strength"] = self.strength.clone()
        telemetry.per_modality["ratio"] = self.ratios.clone()
        telemetry.per_modality["coef"] = self.coefficients.clone()
