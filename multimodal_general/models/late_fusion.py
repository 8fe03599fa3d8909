"""Late fusion shared by the tasks: one encoder per modality, concatenation, a fused head,
and the balancer wired to it.

:class:`LateFusion` takes any encoders (MLPs for the synthetic imbalance task, transformer
encoders over padded sequences for Food-101, CMU-MOSI and IEMOCAP); a subclass says how an
encoder reads its modality from the batch (:meth:`LateFusion.encode`). :func:`attach_balancer`
registers the modalities, one unimodal head each, and the fused head's last layer with any
balancer of :data:`~multimodal_general.balance.BALANCERS`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from multimodal_general.balance import Balancer, BalancerSpec, Modality, concat_unimodal_output
from multimodal_general.errors import ConfigurationError

FUSION_HEADS = ("mlp", "linear")


def mlp(inputs: int, hidden: int, outputs: int, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(inputs, hidden), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(hidden, outputs))


def unimodal_head(feature_dim: int, out_dim: int) -> nn.Sequential:
    """A CGGM head whose last layer has the fused head's last-layer shape."""
    return mlp(feature_dim, feature_dim, out_dim)


class LateFusion(nn.Module):
    """Encoders (each producing ``[N, feature_dim]``), concatenation and a fused head.

    ``fusion_head="mlp"`` (default): a two-layer head (hidden layer of ``feature_dim``).
    ``fusion_head="linear"``: one ``nn.Linear`` over the concatenated features, the late
    fusion OGM-GE needs (its per-modality contributions ``W_i h_i + b / M``).

    ``forward(inputs)`` returns ``(output, features)``: the fused prediction
    ``[N, out_dim]`` and each modality's features ``[N, feature_dim]``. With
    ``feature_dropout`` (e.g. :meth:`ModalityDropout.drop_features`) the features are passed
    through it before the fused head; the returned ``features`` are the undropped ones.
    """

    def __init__(self, encoders: Mapping[str, nn.Module], feature_dim: int, out_dim: int,
                 fusion_head: str = "mlp", dropout: float = 0.0):
        super().__init__()
        if fusion_head not in FUSION_HEADS:
            raise ConfigurationError(f"unknown fusion_head {fusion_head!r}; choose one of {list(FUSION_HEADS)}")
        self.encoders = nn.ModuleDict(dict(encoders))
        self.feature_dim, self.out_dim = feature_dim, out_dim
        fused_dim = feature_dim * len(encoders)
        self.head = (mlp(fused_dim, feature_dim, out_dim, dropout) if fusion_head == "mlp"
                     else nn.Linear(fused_dim, out_dim))

    @property
    def last_layer(self) -> nn.Linear:
        return self.head if isinstance(self.head, nn.Linear) else self.head[-1]

    def encode(self, inputs) -> dict[str, Tensor]:
        """Each modality's features; ``inputs[name]`` is the encoder's input by default."""
        return {name: encoder(inputs[name]) for name, encoder in self.encoders.items()}

    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        return self.head(torch.cat(list(features.values()), dim=1))

    def forward(self, inputs, feature_dropout=None) -> tuple[Tensor, dict[str, Tensor]]:
        features = self.encode(inputs)
        fused = features if feature_dropout is None else feature_dropout(features)
        return self.fuse(fused), features


def attach_balancer(model: LateFusion, spec: BalancerSpec, criterion: nn.Module, kind: str, **common) -> Balancer:
    """The balancer ``spec`` describes over ``model``'s modalities, with one :func:`unimodal_head` each.

    ``kind`` is ``"classification"`` (heads scored by accuracy) or ``"regression"`` (by
    negative MAE); ``common`` go to :meth:`~multimodal_general.balance.BalancerSpec.build` with
    the model's wiring (e.g. ``applied_by_optimizer``).
    """
    modalities = []
    for modality, encoder in model.encoders.items():
        head = unimodal_head(model.feature_dim, model.out_dim)
        modalities.append(Modality(modality, encoder, head, head[-1]))
    return spec.build(
        modalities,
        fused_last_layer=model.last_layer,
        criterion=criterion,
        metric="accuracy" if kind == "classification" else "neg_mae",
        unimodal_output=concat_unimodal_output(model.head, list(model.encoders)),  # AGM's mono-modal responses
        task_kind=kind,
        **common,
    )


class LateFusionNet(LateFusion):
    """One MLP encoder per modality (``hidden`` units, ``feature_dim`` features), concatenation
    and a fused head (see :class:`LateFusion`)."""

    def __init__(
        self, input_dims: dict[str, int], out_dim: int, hidden: int = 64, feature_dim: int = 32,
        fusion_head: str = "mlp",
    ):
        encoders = {name: nn.Sequential(mlp(dim, hidden, feature_dim), nn.ReLU()) for name, dim in input_dims.items()}
        super().__init__(encoders, feature_dim, out_dim, fusion_head)
