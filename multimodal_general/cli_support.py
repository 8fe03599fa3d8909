"""What every console script of the project shares: user errors become one line + exit 2."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from multimodal_general.errors import UserError

stderr = Console(stderr=True)


def run_app(app: typer.Typer) -> None:
    """Run a Typer app; a :class:`UserError` prints ``error: <message>`` and exits 2.

    Usage errors (unknown command or option) are Typer's own, also with exit status 2.
    """
    try:
        app()
    except UserError as error:
        stderr.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
