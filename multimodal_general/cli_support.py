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


def make_app(help_text: str) -> typer.Typer:
    """A Typer app that always has sub-commands (even with one) and no completion flags."""
    app = typer.Typer(help=help_text, no_args_is_help=True, add_completion=False)
    app.callback()(lambda: None)
    return app
