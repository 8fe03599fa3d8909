"""What a training run is made of, built from its configuration: network, auxiliary heads,
balancer, loss, optimizer and learning-rate schedule.

How the baselines are wired to the segmentation network: ``agm`` gets its mono-modal responses
from :class:`~brats_cggm.training.mono_modal.MonoModalResponses` (the fused decoder under a
one-sequence modality mask) and scores them by soft Dice; ``mslr`` gets one optimizer param
group per branch encoder, whose rate is ``scale * lr`` under the schedule (its scales are applied
by the optimizer, never to gradients: AdamW would normalize a gradient scale away);
``gblending``'s weights and MSLR's scales are updated after validations
(:mod:`brats_cggm.training.validation_updates`; the encoder groups' rates follow through
:func:`multimodal_general.training.step.apply_encoder_rates`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from monai.losses import DiceLoss
from torch import Tensor, nn

from brats_cggm.errors import ConfigurationError
from brats_cggm.network import NETWORK_PRESETS
from brats_cggm.network import (
    MultiBranchUNet,
    balancer_modalities,
    build_network,
    make_auxiliary_heads,
)
from brats_cggm.training.config import NetworkConfig, TrainConfig
from brats_cggm.training.mono_modal import MonoModalResponses
from multimodal_general.balance import Balancer


class RegionLoss(nn.Module):
    """Soft Dice (MONAI) plus binary cross-entropy on the TC/WT/ET logits, in float32.

    MONAI's ``DiceCELoss`` applies a softmax cross-entropy to multi-channel inputs even with
    ``sigmoid=True``; the regions overlap (ET is inside TC inside WT), so each channel
    needs its own sigmoid cross-entropy. The Dice is computed over the whole batch per
    region (nnU-Net's "batch Dice" for 3-D): a patch without, say, enhancing tumour then
    does not give that region a loss of 1 for every voxel predicted above zero.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits, target = logits.float(), target.float()
        return self.dice(logits, target) + self.bce(logits, target)


@dataclass
class Components:
    net: nn.Module
    criterion: RegionLoss
    #: None for a network without per-sequence branches (early fusion) or without heads (network.heads false)
    balancer: Balancer | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    #: AGM's mono-modal responses (the training forward pass feeds it); None for other balancers
    responses: MonoModalResponses | None = None
    #: the network's learning rate before any per-encoder factor (``optim.lr``)
    base_lr: float | None = None

    def modules(self) -> dict[str, nn.Module]:
        """What a checkpoint saves (the heads live in the balancer)."""
        return {"net": self.net, **({"balancer": self.balancer} if self.balancer is not None else {})}


def build_components(config: TrainConfig, total_steps: int, device: torch.device) -> Components:
    """Everything a run trains, on ``device``; ``total_steps`` sets the schedule's length."""
    net = network_from_config(config.network).to(device)
    criterion = RegionLoss()
    responses = MonoModalResponses(net) if config.balancer.name == "agm" and isinstance(net, MultiBranchUNet) else None
    balancer = _balancer(config, net, criterion, responses)
    if balancer is not None:
        balancer.to(device)
    groups = _network_groups(net, balancer, config.optim.lr)
    if balancer is not None and any(True for _ in balancer.parameters()):
        groups.append({"params": list(balancer.parameters()), "lr": config.optim.head_lr or config.optim.lr})
    optimizer = _optimizer(config, groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config.optim.schedule, total_steps))
    return Components(net, criterion, balancer, optimizer, scheduler, responses, config.optim.lr)


def _network_groups(net: nn.Module, balancer: Balancer | None, lr: float) -> list[dict]:
    """The network's param groups: one, or for a balancer that sets learning rates (MSLR, CGGM
    with ``scale_by: learning_rate``) one per branch encoder (tagged with its ``modality``, rate
    ``scale * lr``) and one for the rest."""
    if balancer is None or balancer.lr_scales() is None:  # MSLR is built applied_by_optimizer: it sets them
        return [{"params": list(net.parameters())}]
    groups = balancer.param_groups(lr)
    for group, name in zip(groups, balancer.modality_names):
        group["modality"] = name
    in_encoders = {id(p) for group in groups for p in group["params"]}
    return [*groups, {"params": [p for p in net.parameters() if id(p) not in in_encoders]}]


def network_from_config(network: NetworkConfig, revision: int | None = None) -> nn.Module:
    """The network ``network`` describes, built as this version builds it, or as ``revision``
    did (a checkpoint's :func:`~brats_cggm.training.checkpoint.network_revision`)."""
    options = {"sequence_dropout": network.sequence_dropout, **network.overrides}
    preset = NETWORK_PRESETS.get(network.preset)
    if preset is not None and issubclass(preset.network, MultiBranchUNet):  # early fusion has no branches to fuse
        options["fusion"] = network.fusion
        if revision is not None and revision < 2:
            options["normalized_output"] = True
    return build_network(network.preset, **options)


def _balancer(config: TrainConfig, net: nn.Module, criterion: nn.Module,
              responses: MonoModalResponses | None) -> Balancer | None:
    b = config.balancer
    if not isinstance(net, MultiBranchUNet):
        if b.name != "none":
            raise ConfigurationError(
                f"balancer '{b.name}' acts on per-sequence encoders, and the "
                f"'{config.network.preset}' network has none; use balancer none with it"
            )
        return None
    if not config.network.heads:  # joint training without the heads' telemetry (check() refuses others)
        return None
    heads = make_auxiliary_heads(net)
    return b.build(
        balancer_modalities(net, heads), fused_last_layer=net.output_conv, criterion=criterion,
        unimodal_output=responses, task_kind="segmentation", applied_by_optimizer=True,
    )


def _optimizer(config: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    o = config.optim
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.momentum > 0,
                               weight_decay=o.weight_decay)
    return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)


def _schedule(name: str, total_steps: int):
    """The learning-rate factor of optimizer step ``t`` (a function for ``LambdaLR``)."""
    total = max(total_steps, 1)
    if name == "poly":
        return lambda t: (1 - min(t, total - 1) / total) ** 0.9
    if name == "cosine":
        return lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total))
    return lambda t: 1.0
