"""The balancer interface that a plain PyTorch training loop calls around backward.

One optimizer step, with any balancer::

    output, features = model(inputs)                # features: {modality name: h_i}
    task_loss = criterion(output, target)
    loss = task_loss + balancer.extra_loss(features, output, target, task_loss)
    scaler.scale(loss).backward()                   # or loss.backward()
    scaler.unscale_(optimizer)                      # AMP only: telemetry sees true grads
    telemetry = balancer.modulate()                 # once per optimizer step
    scaler.step(optimizer); scaler.step(head_optimizer); scaler.update()

The balancer is an ``nn.Module`` that owns the training-only unimodal heads (train them
with an optimizer over ``balancer.parameters()``) and keeps its running state in
buffers, so ``state_dict()`` / ``load_state_dict()`` resume it exactly. The encoders
stay in the user's model: the balancer holds references to their parameters only.

With gradient accumulation, call ``extra_loss`` for every micro-batch and ``modulate``
once before the optimizer step; statistics of all micro-batches (and, under
torch.distributed, of all ranks) are combined into one measurement per step.

Under torch.distributed only the measurement is global: anything a balancer computes
from gradients (CGGM's cosines) comes from the rank's local batch, and DDP averages the
resulting gradients. With AMP, ``GradScaler`` checks for inf/NaN in ``unscale_``, before
``modulate``; a balancer whose coefficients are bounded (CGGM ``stable``) cannot create
new ones. A step the scaler skips still counts as a step for the balancer.
(:func:`multimodal_general.training.step.balanced_step` is this step, written once.)

After each validation (and, where a loop measures the untrained network, once before
training with ``epoch=0``), the loop calls :meth:`Balancer.on_validation` with a
:class:`Validation`, then re-sets the encoders' learning rates from
:meth:`Balancer.lr_scales` (:func:`multimodal_general.training.step.after_validation`
does both). MSLR adapts its scales there, G-Blending its loss weights; the others do
nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypedDict

try:
    from typing import Unpack
except ImportError:  # Python 3.10
    from typing_extensions import Unpack  # noqa: F401 (the balancers import it from here)

import torch
from torch import Tensor, nn

from multimodal_general.balance.distributed import all_reduce_sum, average_gradients
from multimodal_general.balance.metrics import UtilizationMetric, resolve_metric
from multimodal_general.balance.registration import Modality, validate_modalities
from multimodal_general.balance.telemetry import StepTelemetry
from multimodal_general.errors import ConfigurationError, RegistrationError

Criterion = Callable[[Tensor, Tensor], Tensor]
HeadLosses = Mapping[str, tuple[float, float]]


class CommonOptions(TypedDict, total=False):
    """The options every balancer takes (see :class:`Balancer`); a subclass receives them as
    ``**common`` and passes them on, declaring only its own hyperparameters."""

    criterion: Criterion | None
    metric: str | UtilizationMetric
    accumulation_steps: int
    process_group: Any


COMMON_OPTIONS: frozenset[str] = frozenset(CommonOptions.__annotations__)


class Validation:
    """What a loop measured at one validation, as :meth:`Balancer.on_validation` reads it.

    Args:
        epoch: training epochs done (``0``: the untrained network, before the first epoch).
        head_metrics: each modality's unimodal head's validation metric, higher is better
            (a loop whose metric is lower-is-better passes it negated); a non-finite value
            counts as the worst.
        losses: ``{"fused" | modality: (train_loss, validation_loss)}`` of the fused output
            and of every unimodal head.

    Either may be given as a function of no arguments: it is called (once) only when a
    balancer reads the value, so a loop need not measure what no balancer uses.
    """

    def __init__(
        self,
        epoch: int,
        head_metrics: Mapping[str, float] | Callable[[], Mapping[str, float]] | None = None,
        losses: HeadLosses | Callable[[], HeadLosses] | None = None,
    ) -> None:
        self.epoch = int(epoch)
        self._values = {"head_metrics": head_metrics, "losses": losses}

    def _get(self, key: str):
        value = self._values[key]
        if value is None:
            raise ConfigurationError(f"this loop's validation measures no {key}, and the balancer needs them")
        if callable(value):
            value = self._values[key] = value()
        return value

    @property
    def head_metrics(self) -> Mapping[str, float]:
        return self._get("head_metrics")

    @property
    def losses(self) -> HeadLosses:
        return self._get("losses")


def detached(features: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
    """A modality's features without their graph: one tensor, or a list of tensors (a
    feature pyramid, which a head with skip connections reads)."""
    if isinstance(features, Tensor):
        return features.detach()
    return [level.detach() for level in features]


def check_classification(what: str, output: Tensor, target: Tensor, min_classes: int = 1) -> None:
    """A classification step: an output ``[N, C >= min_classes]`` and class indices ``[N]``;
    anything else is a :class:`ConfigurationError` that names ``what`` needs it."""
    if (
        output.dim() != 2
        or output.shape[1] < min_classes
        or target.dim() != 1
        or target.shape[0] != output.shape[0]
        or target.dtype.is_floating_point
        or target.dtype == torch.bool
    ):
        raise ConfigurationError(
            f"{what}; it needs an output [N, C{f' >= {min_classes}' if min_classes > 1 else ''}] and a target "
            f"of class indices [N], got output {tuple(output.shape)} and target {tuple(target.shape)} of {target.dtype}"
        )


class Balancer(nn.Module):
    """Base class: runs the unimodal heads and measures each modality's utilization.

    Subclasses implement :meth:`_balance_loss` (a differentiable term added to the task
    loss), :meth:`_modulate_gradients` (in-place changes to encoder gradients) and, if they
    adapt between epochs, :meth:`on_validation` and :meth:`lr_scales`. A subclass's
    ``__init__`` declares only its own hyperparameters and passes ``**common`` (the
    :class:`CommonOptions` below) to ``super().__init__``; see ``docs/baselines.md``,
    "Adding a balancer".

    Args:
        modalities: the registered modalities, in a fixed order.
        criterion: the task loss, applied to every head's output as to the fused output.
        metric: utilization metric of the heads (name or callable), see ``metrics``.
        accumulation_steps: micro-batches per optimizer step.
        process_group: the torch.distributed group to combine statistics over.
    """

    name: ClassVar[str] = "base"
    requires_heads: ClassVar[bool] = False
    min_modalities: ClassVar[int] = 1

    def __init__(
        self,
        modalities: Sequence[Modality],
        *,
        criterion: Criterion | None = None,
        metric: str | UtilizationMetric = "accuracy",
        accumulation_steps: int = 1,
        process_group=None,
    ) -> None:
        super().__init__()
        validate_modalities(modalities, need_heads=self.requires_heads, min_count=self.min_modalities)
        if accumulation_steps < 1:
            raise ConfigurationError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        self.modality_names: tuple[str, ...] = tuple(m.name for m in modalities)
        self.heads = nn.ModuleDict({m.name: m.head for m in modalities if m.head is not None})
        if self.heads and criterion is None:
            raise RegistrationError("heads are registered, so a criterion (task loss) is needed")
        self._criterion = (criterion,)  # a tuple: an nn.Module loss must not become a submodule
        self.metric = resolve_metric(metric)
        self.accumulation_steps = accumulation_steps
        self.process_group = process_group
        # Plain containers: the encoders belong to the user's model, not to this module.
        self._encoder_params: dict[str, tuple[nn.Parameter, ...]] = {
            m.name: tuple(m.encoder.parameters()) for m in modalities
        }
        m = len(modalities)
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("_score_sum", torch.zeros(m), persistent=False)
        self.register_buffer("_sample_count", torch.zeros(m), persistent=False)
        self._micro_batches = 0
        self._head_losses: dict[str, Tensor] = {}

    @property
    def criterion(self) -> Criterion | None:
        return self._criterion[0]

    def get_extra_state(self) -> dict:
        """Saved in ``state_dict``: what the buffers mean (their order follows the modalities)."""
        return {"balancer": self.name, "modalities": list(self.modality_names)}

    def set_extra_state(self, state: dict) -> None:
        if state != self.get_extra_state():
            raise ConfigurationError(
                f"balancer state was saved for {state}, but this balancer is {self.get_extra_state()}"
            )

    # ------------------------------------------------------------------ loop API
    def extra_loss(
        self,
        features: Mapping[str, Tensor | None],
        output: Tensor,
        target: Tensor,
        task_loss: Tensor,
    ) -> Tensor:
        """What to add to ``task_loss`` before backward, for one (micro-)batch.

        Args:
            features: each modality's encoder output ``h_i`` (with its graph): a tensor, or
                a list of tensors (a feature pyramid) when its head reads several levels;
                ``None`` for a modality absent from this micro-batch's input (a case that lacks
                it): its head is not run and it is not scored this step (:meth:`step_observed`).
            output: the fused prediction.
            target: the task target.
            task_loss: ``criterion(output, target)`` as the loop computed it.
        Returns:
            the heads' losses (on detached features: they train the heads only) plus the
            balancer's own term; a scalar tensor.
        """
        if self._micro_batches >= self.accumulation_steps:
            raise ConfigurationError(
                f"extra_loss was called {self._micro_batches + 1} times without modulate(); "
                f"accumulation_steps is {self.accumulation_steps}"
            )
        self._micro_batches += 1
        self._head_losses = self._run_heads(features, output, target)
        loss = task_loss.new_zeros(())
        for head_loss in self._head_losses.values():
            loss = loss + head_loss
        return loss + self._balance_loss(features, output, target, task_loss)

    def modulate(self) -> StepTelemetry:
        """After backward, once per optimizer step: modulate encoder gradients in place
        (after DDP's all-reduce, after ``GradScaler.unscale_``) and return telemetry."""
        if self._micro_batches == 0:
            raise ConfigurationError("modulate() was called without extra_loss() in this step")
        average_gradients(self.heads.parameters(), self.process_group)
        telemetry = StepTelemetry(int(self.step_count), self.modality_names)
        if self.heads:
            eps = self.step_utilization()
            telemetry.per_modality["eps"] = torch.where(self.step_observed(), eps, torch.nan)
        telemetry.per_modality["grad_norm"] = self.encoder_grad_norms()
        self._modulate_gradients(telemetry)
        self._score_sum.zero_()
        self._sample_count.zero_()
        self._micro_batches = 0
        self._step_utilization = None
        self.step_count += 1
        return telemetry

    def on_validation(self, validation: Validation) -> dict[str, float] | None:
        """After a validation: adapt from it (nothing by default); returns what changed
        (e.g. new scales or weights) or ``None``."""
        return None

    def param_groups(self, lr: float, **group_options) -> list[dict]:
        """One optimizer param group per encoder, ``lr`` times its :meth:`_group_scales` factor."""
        scales = self._group_scales()
        return [{"params": list(self._encoder_params[name]), "lr": lr * scales.get(name, 1.0), **group_options}
                for name in self.modality_names]

    def _group_scales(self) -> dict[str, float]:
        """The rate factors :meth:`param_groups` starts the encoders at: :meth:`lr_scales`, 1
        for a balancer that sets none."""
        return self.lr_scales() or {}

    def lr_scales(self) -> dict[str, float] | None:
        """Per-modality factors of each encoder's learning rate that the loop applies to its
        optimizer (param groups tagged ``"modality"``); ``None`` (default): the balancer sets no
        rates."""
        return None

    # ------------------------------------------------------------- for subclasses
    def _balance_loss(self, features, output, target, task_loss) -> Tensor:
        return task_loss.new_zeros(())

    def _modulate_gradients(self, telemetry: StepTelemetry) -> None:
        """Change encoder gradients in place; record what was done in ``telemetry``."""

    _step_utilization: Tensor | None = None
    _step_observed: Tensor | None = None

    def step_utilization(self) -> Tensor:
        """``eps_i`` of the current step: each head's mean score over all micro-batches and
        ranks seen since the last ``modulate`` (computed once, then cached)."""
        if self._step_utilization is None:
            stats = torch.cat([self._score_sum, self._sample_count])
            all_reduce_sum(stats, self.process_group)
            scores, counts = stats.chunk(2)
            self._step_utilization = scores / counts.clamp_min(1)
            self._step_observed = counts > 0
        return self._step_utilization

    def step_observed(self) -> Tensor:
        """Which heads were scored in the current step: a modality whose features were ``None``
        in every micro-batch (absent from the input) was not, and its ``eps_i`` means nothing."""
        self.step_utilization()
        return self._step_observed

    def encoder_grads(self, name: str) -> list[Tensor]:
        return [p.grad for p in self._encoder_params[name] if p.grad is not None]

    def encoder_grad_norms(self) -> Tensor:
        norms = []
        for name in self.modality_names:
            grads = self.encoder_grads(name)
            norms.append(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                if grads
                else self._score_sum.new_zeros(())
            )
        return torch.stack([n.float().to(self._score_sum.device) for n in norms])

    @property
    def head_losses(self) -> dict[str, Tensor]:
        """Each head's loss on the last micro-batch (with graph, into the head only)."""
        return self._head_losses

    def _run_heads(self, features, output, target) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        for index, name in enumerate(self.modality_names):
            if name not in self.heads:
                continue
            if name not in features:
                raise RegistrationError(f"features has no entry for modality '{name}'")
            if features[name] is None:  # absent from this micro-batch's input: no head, no score
                continue
            prediction = self.heads[name](detached(features[name]))
            if prediction.shape != output.shape:
                raise RegistrationError(
                    f"head of modality '{name}' predicts shape {tuple(prediction.shape)}, the "
                    f"fused head {tuple(output.shape)}: they must predict the same target"
                )
            losses[name] = self.criterion(prediction, target)
            with torch.no_grad():
                scores = self.metric(prediction.detach(), target)
                self._score_sum[index] += scores.sum().float()
                self._sample_count[index] += scores.numel()
        return losses
