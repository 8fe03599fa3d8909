"""User-facing errors of the BraTS application (see ``multimodal_general.errors``).

Every message names the file (or case) and the problem on one line; the CLIs print it
and exit with status 2.
"""

from __future__ import annotations

from multimodal_general.errors import ConfigurationError, UserError
from multimodal_general.errors import PathError as _PathError


class BadInputFile(_PathError):
    """A file that cannot serve as input: missing, not a NIfTI, truncated, wrong content."""


class InconsistentCase(_PathError):
    """Files of one case that disagree (shapes, affines, grids) or a case that is incomplete."""


class IncompatibleModel(UserError):
    """A model whose card is missing or does not match what inference needs."""


__all__ = ["BadInputFile", "ConfigurationError", "IncompatibleModel", "InconsistentCase", "UserError"]
