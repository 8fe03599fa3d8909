"""Where a result came from: the command, the code revision, the machine and the versions.

Benchmarks and run folders record it beside their numbers, so that a figure can be traced
back and compared only with figures measured under the same conditions.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path


def source_checkout() -> Path | None:
    """The git checkout this code runs from (the folder that holds ``multimodal_general`` and
    ``.git``); None when the code is installed from a wheel."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / ".git").exists() else None


REPO = source_checkout()


def command_line() -> str:
    """The command as typed (``python bench/x.py --quick``)."""
    return shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])


def git_revision(repo: Path | None = REPO) -> str | None:
    """``abc1234`` or ``abc1234+dirty``; None outside a git checkout."""
    if repo is None:
        return None
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def versions(*packages: str) -> dict[str, str | None]:
    """Installed versions of ``packages`` (None for one that is not installed)."""
    found: dict[str, str | None] = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def provenance(*packages: str) -> dict:
    """Command, UTC time, git revision, machine (with its current load) and versions of
    python, torch and ``packages``."""
    import torch

    return {
        "command": command_line(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_revision(),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
            "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        },
        "versions": {"python": platform.python_version(), **versions("torch", *packages)},
    }
