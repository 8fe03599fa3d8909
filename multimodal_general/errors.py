"""User-facing errors: a CLI prints the message on one line and exits with status 2."""


class UserError(Exception):
    """A problem the user can fix (bad input, wrong configuration); never a bug."""


class RegistrationError(UserError, ValueError):
    """Modalities, encoders, heads or the fused head were registered inconsistently."""


class ConfigurationError(UserError, ValueError):
    """An option has a value that cannot work (unknown name, out-of-range number)."""


class OutputError(UserError):
    """An output cannot be written (permissions, a folder in the way, a full disk)."""
