"""User-facing errors of the BraTS application (see ``multimodal_general.errors``).

Every message names the file (or case) and the problem on one line; the CLIs print it
and exit with status 2.
"""

from __future__ import annotations

from pathlib import Path

from multimodal_general.errors import ConfigurationError, UserError


class BadInputFile(UserError):
    """A file that cannot serve as input: missing, not a NIfTI, truncated, wrong content."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}")


class InconsistentCase(UserError):
    """Files of one case that disagree (shapes, affines, grids) or a case that is incomplete."""

    def __init__(self, where: str | Path, problem: str) -> None:
        self.path, self.problem = Path(where), problem
        super().__init__(f"{where}: {problem}")


class IncompatibleModel(UserError):
    """A model whose card is missing or does not match what inference needs."""


__all__ = ["BadInputFile", "ConfigurationError", "IncompatibleModel", "InconsistentCase", "UserError"]
