"""AGM's mono-modal responses for the multi-branch U-Net, through its modality mask.

AGM scores each modality by the fused network's output with only that modality switched on.
Running the whole network once per sequence would encode every branch again; instead the
training forward pass hands its branch feature pyramids to :meth:`MonoModalResponses.remember`
(detached), and a response is the fused decoder on those pyramids under a modality mask that
keeps one sequence, exactly what ``net(image, modality_mask=only_that_one)`` computes (a branch
switched off is left out of every masked mean). AGM calls it without gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from brats_cggm.network import MultiBranchUNet
from multimodal_general.errors import ConfigurationError, RegistrationError


class MonoModalResponses:
    """``unimodal_output(features, keep)`` for :class:`~multimodal_general.balance.AGM` on a
    :class:`MultiBranchUNet`: the logits with only sequence ``keep`` switched on, decoded from
    the pyramids of the last training batch (``remember``)."""

    def __init__(self, net: MultiBranchUNet) -> None:
        self.net = net
        self._pyramids: list[list[Tensor]] | None = None

    def remember(self, pyramids: Sequence[Sequence[Tensor]]) -> None:
        """The training batch's branch pyramids (as ``forward_with_pyramids`` returns them)."""
        self._pyramids = [[level.detach() for level in levels] for levels in pyramids]

    def __call__(self, features: Mapping[str, Tensor], keep: str) -> Tensor:
        if self._pyramids is None:
            raise ConfigurationError("AGM's mono-modal responses need the training forward pass to remember its pyramids")
        if keep not in self.net.modalities:
            raise RegistrationError(f"unknown sequence '{keep}'; the network's branches are {list(self.net.modalities)}")
        batch = self._pyramids[0][0].shape[0]
        mask = torch.zeros(batch, len(self.net.modalities), dtype=torch.bool, device=self._pyramids[0][0].device)
        mask[:, self.net.modalities.index(keep)] = True
        return self.net.decode(self._pyramids, mask)
