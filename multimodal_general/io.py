"""Files written so that a crash or Ctrl-C never leaves a half-written output."""

from __future__ import annotations

import errno
import math
import os
import secrets
import shutil
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from multimodal_general.errors import BadDataFile, ConfigurationError, OutputError, PathError


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it to ``path``.

    A file system problem becomes an :class:`OutputError` naming ``path``; the temporary
    file never stays behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        _remove(tmp)
        raise OutputError(f"{path}: cannot write ({error.strerror or error})") from None
    except BaseException:
        _remove(tmp)
        raise
    return path


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # its folder cannot hold it either: nothing was written
        pass


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def _rename_into_place(tmp: Path, path: Path) -> None:
    if path.is_dir():
        path.rmdir()  # empty, or OSError: nothing is overwritten
    os.replace(tmp, path)


def atomic_folder(path: str | Path, fill: Callable[[Path], object],
                  place: Callable[[Path, Path], object] = _rename_into_place,
                  what: str = "") -> Path:
    """Call ``fill(folder)`` on a new temporary folder beside ``path``, then ``place(folder,
    path)``: by default rename it to ``path`` (which must not exist, or be an empty folder). A
    failure leaves nothing behind; a file system problem becomes an :class:`OutputError`
    naming ``path`` (and ``what`` was being written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        place(tmp, path)
    except OSError as error:
        raise OutputError(f"{path}: cannot write{' ' + what if what else ''} ({error.strerror or error})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def json_safe(value):
    """``value`` with every non-finite float replaced by ``None``, so that JSON files stay strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def save_tagged(path: str | Path, tag: str, payload: dict) -> Path:
    """``torch.save`` of ``{"format": tag, **payload}``, written atomically (a run killed while
    saving keeps the previous file whole)."""
    import torch

    buffer = BytesIO()
    torch.save({"format": tag, **payload}, buffer)
    return atomic_write(path, lambda handle: handle.write(buffer.getbuffer()))


def load_tagged(path: str | Path, tag: str, error: type[PathError] = BadDataFile,
                map_location="cpu") -> dict:
    """A file written by :func:`save_tagged` with ``tag``; anything else (missing, damaged,
    another format) is a one-line ``error(path, problem)``."""
    import torch

    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise error(path, "checkpoint is missing") from None
    except Exception as problem:  # torch raises many kinds for a damaged file
        raise error(path, f"not a readable checkpoint ({type(problem).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != tag:
        raise error(path, f"not a {tag} file")
    return payload


def read_json_object(path: str | Path, what: str, error: type[PathError] = BadDataFile) -> dict:
    """The JSON object in the file ``path`` (``what`` it holds, for the messages); a missing
    or malformed file, or one that holds no object, is a one-line ``error(path, problem)``."""
    import json

    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(path, f"{what} file is missing") from None
    except (OSError, ValueError) as problem:
        raise error(path, f"not a readable JSON file ({problem})") from None
    if not isinstance(values, dict):
        raise error(path, f"the {what} must be a JSON object")
    return values


def pin_settings(path: str | Path, settings: dict) -> None:
    """The first call writes ``settings`` to the YAML file ``path``; later calls must pass the same
    settings (a comparison folder refuses a rerun with others: its tables would mix budgets)."""
    import yaml

    path = Path(path)
    if path.exists():
        if yaml.safe_load(path.read_text()) != settings:
            raise ConfigurationError(f"{path}: this comparison was made with other settings; use another --out")
    else:
        atomic_write_text(path, yaml.safe_dump(settings, sort_keys=False))
