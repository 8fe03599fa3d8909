"""What the balancer adapts from after a validation (MSLR's learning-rate scales, G-Blending's
loss weights), read from the epoch's row (``train_loss``, ``head_loss/<seq>``, ``val_loss``,
``val_head_loss/<seq>``, ``val_head_dice/<seq>``); the trainer passes it to
:func:`multimodal_general.training.step.after_validation`, which updates the balancer and
sets the encoders' rates. The updates act from the next epoch on.

* **MSLR** (adaptive): each sequence's validation metric is its auxiliary head's Dice; a
  sequence whose head did not improve has its encoder's rate scale decayed
  (``MSLR.on_validation``), and the encoder's param group follows (its base rate in the
  schedule too).
* **G-Blending**: a measurement is each head's (fused and per sequence) train and validation
  loss: the epoch's mean loss on the training patches, and the loss on the whole validation
  cases. The first validation is the first measurement; at each later validation at least
  ``super_epoch`` epochs after the kept measurement, the weights are re-estimated from the two
  (``GBlending.on_validation``). Train patches (augmented, tumour-centred crops) and whole
  validation volumes differ in kind, so the overfitting gap ``V - T`` has an offset; the rule
  uses its change over the super-epoch, in which a constant offset cancels. The kept
  measurement is in the balancer's state (so in the checkpoint): a resumed run updates as an
  uninterrupted one. A checkpoint written before kept it in ``progress.extra["gblending"]``;
  :func:`restore_legacy_measurement` moves it into the balancer.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

from multimodal_general.balance import Balancer, GBlending, Validation
from multimodal_general.balance.gblending import FUSED

MeanOverRanks = Callable[[list[float]], list[float]]


def validation_of(
    balancer: Balancer,
    row: dict[str, Any],
    mean_over_ranks: MeanOverRanks = lambda values: values,
) -> Validation:
    """The validation in ``row`` as the balancer reads it. ``mean_over_ranks`` averages the
    rank-local training losses (a collective: every rank reads the losses at the same
    validations, since they hold the same balancer state), so every rank updates alike."""
    names = balancer.modality_names

    def losses() -> dict[str, tuple[float, float]]:
        train_keys = ["train_loss", *(f"head_loss/{name}" for name in names)]
        train = mean_over_ranks([float(row[key]) for key in train_keys])
        val = [float(row["val_loss"]), *(float(row[f"val_head_loss/{name}"]) for name in names)]
        return {key: (t, v) for key, t, v in zip((FUSED, *names), train, val)}

    return Validation(row["epoch"], lambda: {name: row[f"val_head_dice/{name}"] for name in names}, losses)


def restore_legacy_measurement(balancer: Balancer | None, extra: MutableMapping[str, Any]) -> None:
    """A checkpoint from before G-Blending kept its measurement itself: move it from the
    progress's ``extra`` into the balancer."""
    legacy = extra.pop("gblending", None)
    if legacy is not None and isinstance(balancer, GBlending) and balancer.measurement() is None:
        balancer.keep_measurement(legacy["epoch"], legacy["losses"])
