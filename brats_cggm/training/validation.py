"""Validation on whole cases: sliding-window inference (MONAI, Gaussian blending) of the
fused network and of each auxiliary head, scored per region with :mod:`brats_cggm.metrics`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext

import torch
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

from brats_cggm import MODALITIES
from brats_cggm.metrics import REGIONS, region_metrics
from multimodal_general.balance.metrics import hard_dice


def window_predictor(net: nn.Module, heads: Mapping[str, nn.Module], available: Tensor | None = None):
    """``x -> (fused logits, head logits...)``: one pass through the branches serves the
    fused network and every head (MONAI blends each output of the tuple separately).
    ``available [M]``: the sequences the case has (the others switched off; pass only the heads
    of those it has)."""

    def predict(image: Tensor) -> tuple[Tensor, ...]:
        mask = None if available is None else available.to(image.device).expand(image.shape[0], -1)
        if not heads:
            return (net(image, mask),)
        logits, features = net.forward_with_features(image, mask)
        return (logits, *(head(features[name]) for name, head in heads.items()))

    return predict


@torch.no_grad()
def validate_cases(
    net: nn.Module,
    heads: Mapping[str, nn.Module],
    cases: Iterable[dict],
    *,
    roi_size: tuple[int, int, int],
    overlap: float,
    sw_batch_size: int,
    hd95: bool,
    autocast=nullcontext,
    criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> list[dict]:
    """One row per case: ``case_id``, ``dice/<region>``, ``hd95/<region>`` of the fused
    prediction, ``head_dice/<modality>`` (each head's hard Dice, averaged over regions) and
    ``head_region_dice/<modality>/<region>`` (the same per region, as the fused Dice is);
    with a ``criterion`` also the training loss of the whole case, ``loss`` (fused) and
    ``head_loss/<modality>`` (what G-Blending's weights are estimated from).

    ``cases`` yields preprocessed data dicts (``image [4, ...]``, ``label [3, ...]``, and
    ``available [4]`` when a case lacks sequences: they are switched off, and their heads have
    no row).
    """
    was_training = [m.training for m in (net, *heads.values())]
    for module in (net, *heads.values()):
        module.eval()
    device = next(net.parameters()).device
    rows = []
    try:
        for data in cases:
            image, label = data["image"], data["label"]
            available = torch.as_tensor(data.get("available", [True] * image.shape[0])).bool()
            names = [m for m, on in zip(MODALITIES, available.tolist()) if on]
            case_heads = {name: head for name, head in heads.items() if name in names}
            predict = window_predictor(net, case_heads, None if bool(available.all()) else available)
            with autocast():
                outputs = sliding_window_inference(
                    torch.as_tensor(image)[None].to(device), roi_size, sw_batch_size, predict,
                    overlap=overlap, mode="gaussian",
                )
            if isinstance(outputs, Tensor):  # MONAI returns a predictor's 1-tuple unpacked
                outputs = (outputs,)
            target = torch.as_tensor(label)[None].to(device)
            spacing = [float(s) for s in image.pixdim] if hasattr(image, "pixdim") else [1.0, 1.0, 1.0]
            row = {"case_id": data["case_id"]}
            row.update(region_metrics((outputs[0][0] > 0).cpu(), target[0].cpu() > 0.5, spacing, hd95=hd95))
            if criterion is not None:
                row["loss"] = float(criterion(outputs[0], target))
            for name, head_logits in zip(case_heads, outputs[1:]):
                row[f"head_dice/{name}"] = float(hard_dice(head_logits.float(), target)[0])
                by_region = region_metrics((head_logits[0] > 0).cpu(), target[0].cpu() > 0.5, spacing, hd95=False)
                row.update({f"head_region_dice/{name}/{r}": by_region[f"dice/{r}"] for r in REGIONS})
                if criterion is not None:
                    row[f"head_loss/{name}"] = float(criterion(head_logits, target))
            rows.append(row)
    finally:
        for module, mode in zip((net, *heads.values()), was_training):
            module.train(mode)
    return rows
