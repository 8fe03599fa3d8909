"""User-facing errors of the BraTS application (see ``multimodal_general.errors``).

Every message names the file (or case) and the problem on one line; the CLIs print it
and exit with status 2.
"""

from __future__ import annotations

from pathlib import Path

from multimodal_general.errors import ConfigurationError, UserError


class _PathError(UserError):
    """``"<path>: <problem>"``; survives pickling and torch's DataLoader, which re-raises a
    worker's exception as ``type(message)``."""

    def __init__(self, path: str | Path, problem: str | None = None) -> None:
        if problem is None:  # rebuilt from its message alone
            line = str(path).rstrip().rsplit("\n", 1)[-1]
            path, _, problem = line.partition(": ")
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):
        return type(self), (str(self.path), self.problem)


class BadInputFile(_PathError):
    """A file that cannot serve as input: missing, not a NIfTI, truncated, wrong content."""


class InconsistentCase(_PathError):
    """Files of one case that disagree (shapes, affines, grids) or a case that is incomplete."""


class IncompatibleModel(UserError):
    """A model whose card is missing or does not match what inference needs."""


__all__ = ["BadInputFile", "ConfigurationError", "IncompatibleModel", "InconsistentCase", "UserError"]
