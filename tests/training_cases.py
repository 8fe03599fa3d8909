"""Helpers of the tests: a tiny training configuration, readers of a run folder, bitwise
comparison of checkpoints, the console script in a subprocess, and torch's thread count
set for a while.

Run as a script under torchrun, this file is the distributed worker of the DDP test::

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=2 \
        tests/training_cases.py train --config tiny.yaml --out RUN

It runs ``brats-cggm train`` (the CLI's own code, with the arguments given) and, after
training, each rank saves its own network and balancer state to ``RUN/rank{r}.pt`` so that
the test can check that the ranks ended identical.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from brats_cggm.training import Place, resolve_config

#: the console script of the venv running the tests
CONSOLE_SCRIPT = Path(sys.executable).with_name("brats-cggm")
REPO = Path(__file__).resolve().parent.parent
MODALITIES = ("flair", "t1", "t1ce", "t2")
#: metrics that are measured, not computed: they differ between two identical runs
TIMING = ("time_s", "step_s")
CPU = Place(0, 1, torch.device("cpu"))


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` inside the block, restored after it.
    The tests' models are tiny: on a shared 2-core machine, two OpenMP threads spin against
    each other and the other processes, and one thread is often many times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)

#: A configuration that trains in about a second per epoch on 2 CPU cores: 32^3 phantoms
#: (7.5 mm voxels) resampled to 7.5 mm (about 19 x 23 x 20 voxels once cropped), 16^3
#: patches, one patch per case, a three-level network 4-8-8 (divisor 8: the deepest grid
#: of a patch is 2^3, enough for instance norm), 2 of the 6 cases in validation.
TINY: dict[str, Any] = {
    "preprocess.patch_size": [16, 16, 16],
    "preprocess.spacing": [7.5, 7.5, 7.5],
    "preprocess.num_samples": 1,
    "network.overrides": {"channels": [4, 8, 8], "strides": [2, 2, 2], "head_channels": 2, "num_res_units": 1},
    "optim.epochs": 3,
    "validation.every": 2,
    "validation.hd95": False,
    "data.val_fraction": 0.34,
    "device": "cpu",
}
#: the early-fusion baseline at the same size (MONAI UNet: one stride fewer than channels)
EARLY_FUSION = {"channels": [4, 8, 8], "strides": [2, 2], "num_res_units": 1}


def tiny_config(data_dir: Path, **overrides: Any):
    """The tiny configuration for ``data_dir``; keyword names use ``__`` for dots
    (``optim__epochs=2``)."""
    values = {**TINY, "data.dir": str(data_dir), **{k.replace("__", "."): v for k, v in overrides.items()}}
    return resolve_config("cpu-small", overrides=values)


def nested(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": 0.1}`` -> ``{"optim": {"lr": 0.1}}`` (a configuration file's shape)."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        *sections, name = key.split(".")
        target = out
        for section in sections:
            target = target.setdefault(section, {})
        target[name] = value
    return out


# ----------------------------------------------------------------- run folders
def load_last(run: Path) -> dict[str, Any]:
    return torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)


def read_metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def without_timing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


# ------------------------------------------------------------------ comparison
def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two checkpoint payloads (nested dicts, lists, tensors, numbers) are not
    bitwise equal; empty when they are."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{where}: tensor vs {type(b).__name__ if isinstance(a, torch.Tensor) else type(a).__name__}"]
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"]
        if torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                 and torch.equal(a.nan_to_num(), b.nan_to_num())):
            return []
        diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "?"
        return [f"{where}: max |diff| {diff}"]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(map(str, a.keys() ^ b.keys()))} in only one"]
        return [d for key in a for d in differences(a[key], b[key], f"{where}/{key}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


#: what must be identical between a straight run and an interrupted-and-resumed one
RESUMED_STATE = ("modules", "optimizer", "scheduler", "scaler", "progress", "world_size")


def assert_same_training_state(straight: Path, resumed: Path) -> None:
    a, b = load_last(straight), load_last(resumed)
    found = [d for key in RESUMED_STATE for d in differences(a[key], b[key], key)]
    assert not found, f"{len(found)} difference(s) between the straight and the resumed run:\n" + "\n".join(found[:20])


def all_finite(state: dict[str, Any]) -> list[str]:
    """Names of floating-point tensors of a state dict that hold NaN or infinity."""
    return [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
            and not torch.isfinite(v).all()]


# ------------------------------------------------------------------ subprocess
def subprocess_env() -> dict[str, str]:
    """One thread everywhere: two processes compute bitwise the same."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", COLUMNS="200")


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``brats-cggm ARGS`` in a subprocess, waited for."""
    return subprocess.run([str(CONSOLE_SCRIPT), *map(str, args)], check=False, cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_cli(*args: str, log: Path) -> subprocess.Popen:
    """``brats-cggm ARGS`` started in the background, output to ``log``."""
    with log.open("w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([str(CONSOLE_SCRIPT), *map(str, args)], cwd=REPO, env=subprocess_env(),
                                stdout=handle, stderr=subprocess.STDOUT)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a user error prints (``error: ...``), checked to be alone."""
    assert result.returncode == 2, f"exit status {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ------------------------------------------------------------- the DDP worker
def _ddp_worker(argv: list[str]) -> int:
    """``brats-cggm`` with ``argv`` under torchrun; each rank then saves its own state."""
    import torch.distributed as dist

    from brats_cggm import cli
    from brats_cggm.training import Trainer

    fit = Trainer.fit

    def fit_and_dump(self):
        summary = fit(self)
        state = {"rank": self.place.rank, "world_size": self.place.world_size,
                 "net": self.parts.net.state_dict(),
                 "balancer": self.parts.balancer.state_dict() if self.parts.balancer is not None else None,
                 "optimizer": self.parts.optimizer.state_dict()}
        torch.save(state, self.run_dir / f"rank{dist.get_rank()}.pt")
        return summary

    Trainer.fit = fit_and_dump
    sys.argv = ["brats-cggm", *argv]
    cli.main()
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(_ddp_worker(sys.argv[1:]))


def in_process(capsys, *argv: Any) -> tuple[int, str, str]:
    """``brats-cggm ARGV`` in this process: (exit status, stdout, stderr)."""
    from brats_cggm import cli

    saved = sys.argv
    sys.argv = ["brats-cggm", *map(str, argv)]
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved
    out = capsys.readouterr()
    return code, out.out, out.err
