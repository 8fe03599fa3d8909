"""Checkpoints of a run: ``last.pt`` resumes it exactly, ``best.pt`` holds the model that
validated best. Both are written atomically: a run killed while saving keeps the
previous file whole."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brats_cggm import MODALITIES
from brats_cggm.errors import BadInputFile, ConfigurationError, IncompatibleModel
from multimodal_general.io import load_tagged, save_tagged

FORMAT = "brats-cggm-checkpoint/1"


@dataclass
class Progress:
    """Where the run is: ``epoch`` counts finished epochs, ``batch`` the batches done of
    the epoch after it (non-zero only for a checkpoint written on Ctrl-C)."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_dice: float = float("-inf")
    best_epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_sha256(*modules: torch.nn.Module) -> str:
    """A digest of the modules' state (names, shapes, dtypes and values of every tensor)."""
    digest = hashlib.sha256()
    for module in modules:
        for name, value in module.state_dict().items():
            if isinstance(value, torch.Tensor):
                digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
                digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


#: how this version builds networks, recorded in every checkpoint: 2 = the multi-branch
#: network's fused decoder ends in a linear layer (:class:`~brats_cggm.network.decoder.FusedDecoder`);
#: a checkpoint without the key (revision 1) normalised it, and its network is built so again
NETWORK_REVISION = 2


def save(path: Path, payload: dict[str, Any]) -> Path:
    """``payload`` plus the format tag, the modality order and the network revision, written atomically."""
    return save_tagged(path, FORMAT, {"modalities": list(MODALITIES), "network_revision": NETWORK_REVISION, **payload})


def network_revision(payload: dict[str, Any]) -> int:
    """How the checkpoint's network was built (:data:`NETWORK_REVISION`; 1 before it was recorded)."""
    return int(payload.get("network_revision", 1))


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`save`; one-line errors for anything else."""
    payload = load_tagged(path, FORMAT, BadInputFile, map_location)
    if payload.get("modalities") != list(MODALITIES):
        raise IncompatibleModel(
            f"{path}: trained with sequences {payload.get('modalities')}, this version expects {list(MODALITIES)}"
        )
    return payload


CHECKPOINTS = ("best", "last")


def run_checkpoint(run_dir: Path, which: str = "best") -> Path:
    """``RUN/checkpoints/best.pt`` or ``last.pt``; another name is an error."""
    if which not in CHECKPOINTS:
        raise ConfigurationError(f"--checkpoint must be best or last, not '{which}'")
    return Path(run_dir) / "checkpoints" / f"{which}.pt"


def network_from_payload(payload: dict[str, Any], path: Path, device: str | torch.device = "cpu"):
    """The network of a checkpoint already read with :func:`load` (``best.pt`` or ``last.pt``),
    in eval mode, with the run's configuration: ``(net, TrainConfig)``. A whole run folder:
    :func:`brats_cggm.training.trained.load_run`."""
    from brats_cggm.training.components import network_from_config
    from brats_cggm.training.config import TrainConfig

    config = TrainConfig.from_dict(payload["config"], str(path))
    net = network_from_config(config.network, network_revision(payload))
    net.load_state_dict(network_weights(payload))
    return net.to(device).eval(), config


def network_weights(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The network's state dict in a checkpoint read with :func:`load`."""
    return payload["network"] if payload.get("kind") == "model" else payload["modules"]["net"]


def initialize_from(net: torch.nn.Module, source: str | Path) -> Path:
    """Weights-only initialisation (``--init``): ``net`` takes the network weights of a run
    folder's ``best.pt`` (or of the checkpoint file ``source``); optimizer, schedule, balancer
    and progress start afresh. The network must be built as the source's was."""
    path = Path(source)
    if path.is_dir():
        path = run_checkpoint(path, "best")
    weights = network_weights(load(path))
    try:
        net.load_state_dict(weights)
    except RuntimeError as error:
        detail = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise IncompatibleModel(
            f"{path}: its network does not match this run's (same network preset, fusion and "
            f"overrides needed): {detail}"
        ) from None
    return path
