"""User-facing errors: a CLI prints the message on one line and exits with status 2."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem the user can fix (bad input, wrong configuration); never a bug."""


class RegistrationError(UserError, ValueError):
    """Modalities, encoders, heads or the fused head were registered inconsistently."""


class ConfigurationError(UserError, ValueError):
    """An option has a value that cannot work (unknown name, out-of-range number)."""


class OutputError(UserError):
    """An output cannot be written (permissions, a folder in the way, a full disk)."""


class PathError(UserError):
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


class BadDataFile(PathError):
    """A data file that cannot serve as input: missing, unreadable, wrong keys, shapes or labels."""
