"""A trained run, loaded once for whoever needs it (export, the segmenter on a run folder,
the benchmarks): the network of ``RUN/checkpoints/<checkpoint>.pt`` in eval mode with the
run's configuration and training record.

>>> run = load_run("runs/demo")                # best.pt on the CPU
>>> run.net, run.config.preprocessing, run.epoch, run.weights_sha256
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from torch import nn

from brats_cggm.training.checkpoint import load, network_from_payload, run_checkpoint, state_sha256
from brats_cggm.training.config import TrainConfig


@dataclass(frozen=True, eq=False)
class TrainedRun:
    """One checkpoint of a run folder, read and built."""

    run_dir: Path
    #: the file read (``RUN/checkpoints/best.pt`` or ``last.pt``)
    checkpoint: Path
    #: the checkpoint as :func:`~brats_cggm.training.checkpoint.load` read it
    payload: dict[str, Any]
    #: the network, in eval mode
    net: nn.Module
    config: TrainConfig

    @property
    def epoch(self) -> int | None:
        """The epochs trained when the checkpoint was written."""
        return self.payload.get("epoch")

    @property
    def metrics(self) -> dict[str, Any]:
        """The validation metrics recorded with the checkpoint."""
        return self.payload.get("metrics", {})

    @property
    def divisor(self) -> int:
        """What every spatial size the network takes must be a multiple of."""
        return int(getattr(self.net, "divisor", 16))

    @property
    def fusion(self) -> str | None:
        """The network's fusion (None for a network without one)."""
        return getattr(self.net, "fusion_name", None)

    @cached_property
    def weights_sha256(self) -> str:
        """A digest of the network's weights (names, shapes, values)."""
        return state_sha256(self.net)

    @cached_property
    def fold(self) -> dict[str, list[str]]:
        """The case ids the run trained and validated on (empty lists without ``split.json``)."""
        split_file = self.run_dir / "split.json"
        if not split_file.exists():
            return {"train": [], "val": []}
        return json.loads(split_file.read_text())["folds"][self.config.data.fold]


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str = "cpu") -> TrainedRun:
    """``RUN/checkpoints/<checkpoint>.pt`` (``best`` or ``last``) with its network on
    ``device``; one-line errors for a missing or foreign checkpoint."""
    run_dir = Path(run_dir)
    path = run_checkpoint(run_dir, checkpoint)
    payload = load(path, map_location=device)
    net, config = network_from_payload(payload, path, device)
    return TrainedRun(run_dir, path, payload, net, config)
