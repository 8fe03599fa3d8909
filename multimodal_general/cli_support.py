"""What every console script of the project shares: user errors become one line + exit 2."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from multimodal_general.errors import ConfigurationError, UserError

stderr = Console(stderr=True)


def run_app(app: typer.Typer) -> None:
    """Run a Typer app; a :class:`UserError` prints ``error: <message>`` and exits 2.

    Usage errors (unknown command or option) are Typer's own, also with exit status 2.
    """
    try:
        app()
    except UserError as error:
        # escaped: a message's own brackets (pip install 'brats-cggm[app]') are text, not markup
        stderr.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)


def make_app(help_text: str) -> typer.Typer:
    """A Typer app that always has sub-commands (even with one) and no completion flags."""
    app = typer.Typer(help=help_text, no_args_is_help=True, add_completion=False)
    app.callback()(lambda: None)
    return app


def parse_settings(settings: list[str], option: str = "--set", example: str = "optim.lr=0.1") -> dict[str, object]:
    """``["optim.lr=0.1", "network.overrides={channels: [8, 16, 32, 64]}"]`` -> a dict of
    names to YAML-parsed values; a malformed item is a one-line :class:`ConfigurationError`."""
    import yaml

    parsed = {}
    for item in settings:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise ConfigurationError(f"{option} takes name=value (e.g. {example}), not '{item}'")
        try:
            parsed[name.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigurationError(f"{option} {item}: the value is not valid YAML") from None
    return parsed


#: the balancer settings that have an option of their own in both command lines' ``train``
#: (``--balancer-option`` is for the rest: a baseline's hyperparameters)
OWN_OPTIONS = {"preset": "--cggm-preset", "rho": "--rho", "lam": "--lam"}


def parse_balancer_options(items: list[str] | None, own: dict[str, str] | None = None) -> dict[str, object]:
    """``--balancer-option NAME=VALUE`` items (repeatable, both command lines) -> a dict; a name
    in ``own`` (a setting with an option of its own, e.g. ``rho``: ``--rho``) is refused."""
    options = parse_settings(items or [], "--balancer-option", "alpha=0.5")
    for name in options:
        if name in (own or {}):
            raise ConfigurationError(f"--balancer-option {name}=...: {name} has an option of its own, {own[name]}")
    return options


def renamed(value, old_value, name: str, old_name: str):
    """An option given by its name or by its former one (kept, hidden, for old scripts);
    two different values are a one-line error."""
    if old_value is None:
        return value
    if value is not None and value != old_value:
        raise ConfigurationError(f"{old_name} is the former name of {name}; give one of them (got {old_value!r} and {value!r})")
    return old_value


def progress_bar(console: Console, *, elapsed: bool = True, transient: bool = False,
                 extra: Sequence[ProgressColumn] = ()) -> Progress:
    """The command lines' progress bar: description, bar, done/total, (``extra`` columns,)
    (elapsed,) remaining."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *extra]
    columns += [TimeElapsedColumn()] if elapsed else []
    return Progress(*columns, TimeRemainingColumn(), console=console, transient=transient)
