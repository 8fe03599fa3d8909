"""Balancer updates that follow a validation: MSLR's learning-rate scales and G-Blending's
loss weights. Both read the epoch's row after validation (``train_loss``, ``head_loss/<seq>``,
``val_loss``, ``val_head_loss/<seq>``, ``val_head_dice/<seq>``) and act from the next epoch on.

* **MSLR** (adaptive): each sequence's validation metric is its auxiliary head's Dice; a
  sequence whose head did not improve has its encoder's rate scale decayed
  (``MSLR.update_from_validation``), and the encoder's param group follows
  (:func:`~brats_cggm.training.components.set_encoder_rates`).
* **G-Blending**: a measurement is each head's (fused and per sequence) train and validation
  loss: the epoch's mean loss on the training patches, and the loss on the whole validation
  cases. The first validation is the first measurement; at each later validation at least
  ``super_epoch`` epochs after the last measurement, the weights are re-estimated from the two
  (``GBlending.update_from_losses``). Train patches (augmented, tumour-centred crops) and whole
  validation volumes differ in kind, so the overfitting gap ``V - T`` has an offset; the rule
  uses its change over the super-epoch, in which a constant offset cancels. The last
  measurement is kept in the checkpoint, so a resumed run updates as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, MutableMapping
from typing import Any

from brats_cggm.training.components import Components, set_encoder_rates
from multimodal_general.balance import MSLR, GBlending
from multimodal_general.balance.gblending import FUSED

MeanOverRanks = Callable[[list[float]], list[float]]


def update_after_validation(
    parts: Components,
    row: dict[str, Any],
    base_lr: float,
    state: MutableMapping[str, Any],
    mean_over_ranks: MeanOverRanks = lambda values: values,
) -> None:
    """Apply the balancer's validation-time update (nothing for the other balancers).

    ``state`` is a mapping that the checkpoint keeps (G-Blending's last measurement lives in it);
    ``mean_over_ranks`` averages the rank-local training losses, so every rank updates alike.
    """
    balancer = parts.balancer
    if isinstance(balancer, MSLR):
        dice = {name: row[f"val_head_dice/{name}"] for name in balancer.modality_names}
        balancer.update_from_validation({n: v if math.isfinite(v) else -math.inf for n, v in dice.items()})
        set_encoder_rates(parts, base_lr)
    elif isinstance(balancer, GBlending):
        losses = blending_losses(balancer, row, mean_over_ranks)
        previous = state.get("gblending")
        if previous is not None and row["epoch"] - previous["epoch"] < balancer.super_epoch:
            return
        if previous is not None:
            balancer.update_from_losses(previous["losses"], losses)
        state["gblending"] = {"epoch": row["epoch"], "losses": losses}


def blending_losses(balancer: GBlending, row: dict[str, Any], mean_over_ranks: MeanOverRanks) -> dict[str, tuple[float, float]]:
    """``{head: (train loss, validation loss)}`` for the fused network and every sequence's head."""
    train_keys = ["train_loss", *(f"head_loss/{name}" for name in balancer.modality_names)]
    train = mean_over_ranks([float(row[key]) for key in train_keys])
    val = [float(row["val_loss"]), *(float(row[f"val_head_loss/{name}"]) for name in balancer.modality_names)]
    return {key: (t, v) for key, t, v in zip((FUSED, *balancer.modality_names), train, val)}

