"""Modality dropout: drop whole modalities of random samples during training.

A balancer sees features after the model has fused them, so it cannot itself remove a
modality from the prediction. The dropping happens before fusion, in one of two ways:

* in the model, through its modality mask (the BraTS networks take
  ``modality_dropout=p``): build this balancer with ``applied_by_model=True``; it then
  changes nothing and only records ``p``;
* in the loop, for a model without a mask: call :meth:`ModalityDropout.drop_features` on
  the encoder outputs before the fused head (dropped features are zeroed, not rescaled)::

      features = {name: encoder(inputs[name]) for name, encoder in model.encoders.items()}
      features = balancer.drop_features(features)
      output = model.head(torch.cat(list(features.values()), dim=1))

  A step whose ``extra_loss`` comes without a ``drop_features`` call is refused with a
  clear error, so a loop that forgot to drop does not silently train jointly.

:func:`drop_mask` never drops every modality of a sample: a sample that would lose all of
them keeps one, chosen at random (as the BraTS mask does). Encoder gradients are untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from multimodal_general.balance.base import Balancer, CommonOptions, Unpack
from multimodal_general.balance.registration import Modality
from multimodal_general.balance.telemetry import StepTelemetry
from multimodal_general.errors import ConfigurationError


def drop_mask(
    batch_size: int,
    modalities: int | Sequence[str],
    p: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """A ``[batch_size, M]`` bool mask, True = keep: each entry dropped with probability ``p``,
    but never all of a sample's (one modality, uniformly chosen, is then kept)."""
    m = modalities if isinstance(modalities, int) else len(modalities)
    if m < 1:
        raise ConfigurationError("drop_mask needs at least one modality")
    if not 0.0 <= p < 1.0:
        raise ConfigurationError(f"modality dropout probability must be in [0, 1), got {p}")
    if generator is not None:
        device = generator.device
    keep = torch.rand(batch_size, m, generator=generator, device=device) >= p
    rescue = torch.randint(m, (batch_size,), generator=generator, device=device)
    lost = ~keep.any(dim=1)
    keep[lost, rescue[lost]] = True
    return keep


class ModalityDropout(Balancer):
    """Modality dropout: whole modalities of random samples are zeroed before fusion (in the model or the loop).

    Args:
        modalities: the registered modalities (heads optional, trained and reported).
        drop_probability: probability of dropping one modality of one sample.
        applied_by_model: the model drops modalities itself through its mask (BraTS).
        noise_seed: seed of the masks (combined with the step count, for exact resume).
        criterion, metric, accumulation_steps, process_group: as for every balancer.
    """

    name = "modality_dropout"

    def __init__(
        self,
        modalities: Sequence[Modality],
        *,
        drop_probability: float = 0.25,
        applied_by_model: bool = False,
        noise_seed: int = 0,
        **common: Unpack[CommonOptions],
    ) -> None:
        super().__init__(modalities, **common)
        if not 0.0 <= drop_probability < 1.0:
            raise ConfigurationError(f"drop_probability must be in [0, 1), got {drop_probability}")
        self.drop_probability = float(drop_probability)
        self.applied_by_model = bool(applied_by_model)
        self.noise_seed = int(noise_seed)
        m = len(modalities)
        self.register_buffer("_kept", torch.zeros(m, dtype=torch.float64), persistent=False)
        self.register_buffer("_seen", torch.zeros((), dtype=torch.float64), persistent=False)
        self._masks_drawn = 0

    def mask(self, batch_size: int, device: torch.device | str | None = None) -> Tensor:
        """This micro-batch's keep mask ``[N, M]``, reproducible from the step count."""
        generator = torch.Generator(device=device or "cpu")
        seed = self.noise_seed * 1_000_003 + int(self.step_count) * 1_009 + self._masks_drawn
        generator.manual_seed(seed % (2**63 - 1))
        self._masks_drawn += 1
        keep = drop_mask(batch_size, len(self.modality_names), self.drop_probability, generator)
        self._kept += keep.sum(dim=0).double()
        self._seen += batch_size
        return keep

    def drop_features(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``features`` with the dropped modalities of each sample zeroed (call before fusion)."""
        first = features[self.modality_names[0]]
        keep = self.mask(first.shape[0], first.device)
        out = dict(features)
        for index, name in enumerate(self.modality_names):
            h = features[name]
            column = keep[:, index].view(-1, *([1] * (h.dim() - 1)))
            out[name] = h * column.to(h.dtype)
        return out

    def _balance_loss(self, features, output, target, task_loss) -> Tensor:
        if not self.applied_by_model and self._masks_drawn < self._micro_batches:
            raise ConfigurationError(
                "modality_dropout cannot change the model's input itself: call "
                "balancer.drop_features(features) before the fused head in every micro-batch, "
                "or build it with applied_by_model=True for a model that drops modalities through "
                "its own mask (e.g. the BraTS network's modality_dropout)"
            )
        return task_loss.new_zeros(())

    def _modulate_gradients(self, telemetry: StepTelemetry) -> None:
        if not self.applied_by_model:
            telemetry.per_modality["kept"] = (self._kept / self._seen.clamp_min(1)).float()
        telemetry.scalars["drop_probability"] = self.drop_probability
        self._kept.zero_()
        self._seen.zero_()
        self._masks_drawn = 0
