"""Per-step telemetry of a balancer, kept as tensors until someone reads it."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class StepTelemetry:
    """What a balancer saw and did in one optimizer step.

    Per-modality values are tensors of shape ``[M]`` in registration order (absent when the
    balancer does not compute them). ``grad_norm`` is each encoder's gradient norm as
    backward left it, before the balancer scaled it (CGGM applies ``B * grad_norm``). Converting to Python floats is deferred to
    :meth:`as_dict` so that a GPU loop is not synchronised every step.
    """

    step: int
    modalities: tuple[str, ...]
    per_modality: dict[str, Tensor] = field(default_factory=dict)
    scalars: dict[str, Tensor | float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        """Flat ``{"step": 3, "B/audio": 0.8, ..., "L_gm": 0.1}`` for loggers and CSV files."""
        row: dict[str, float] = {"step": float(self.step)}
        for key, values in self.per_modality.items():
            for name, value in zip(self.modalities, values.detach().cpu().tolist()):
                row[f"{key}/{name}"] = value
        for key, value in self.scalars.items():
            row[key] = float(value)
        return row
