"""The rule of ``train --resume`` in both command lines (and of the runs they continue): a run
continues as configured; only its epochs may change (torch-free)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from multimodal_general.errors import ConfigurationError


def differences(run: Mapping[str, Any], asked: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{name: (the run's value, the one asked for)}`` for every setting the two do not share."""
    return {name: (run.get(name), asked.get(name))
            for name in sorted(set(run) | set(asked)) if run.get(name) != asked.get(name)}


def check_resume(changes: Mapping[str, tuple[Any, Any]], epochs: str, run: object = None) -> None:
    """Refuse to resume a run with other settings than its own: ``changes`` maps each setting
    asked for otherwise, by the name the message gives it (``--lr``, ``optim.lr``), to (the
    run's value, the one asked for); ``epochs`` is the name of the one that may change. Any
    other is a one-line error naming each with both values (prefixed by ``run``, when given)."""
    refused = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items() if name != epochs)
    if refused:
        where = f"{run}: " if run is not None else ""
        raise ConfigurationError(f"{where}--resume continues the run as configured; only --epochs may change "
                                 f"(got {refused})")
