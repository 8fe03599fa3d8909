"""bench/gpu_check.sh: its dry run walks every step on the CPU (phantoms, the `gpu` preset
with mixed precision for none and cggm, export, both inference backends) and writes the
figures; bad options and a machine without a GPU get one line and exit 2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
STEPS = ["environment", "phantoms", "train_none", "train_cggm", "export", "infer_onnxruntime", "infer_torch"]


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO, check=False)


def test_dry_run_walks_every_step_and_writes_the_figures(tmp_path):
    result = run("--dry-run", "--python", sys.executable, "--out", str(tmp_path / "check"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    assert report["mode"] == "dry-run (CPU)" and list(report["steps"]) == STEPS
    steps = report["steps"]
    assert all(step["status"] == "ok" and step["took_s"] > 0 for step in steps.values()), steps
    for balancer in ("none", "cggm"):
        train = steps[f"train_{balancer}"]
        assert train["balancer"] == balancer and train["epochs"] == 1 and train["steps"] >= 1
        assert train["loss_finite"] and all(math.isfinite(v) for v in train["loss"])
        assert train["amp_dtype"] == "bfloat16" and train["step_s_after_first_epoch"] > 0  # mixed precision on
        assert train["patch_size"] == [32, 32, 32] and train["peak_gpu_mib"] is None
    assert steps["export"]["parity_max_abs_diff_probabilities"] < 1e-2
    assert (tmp_path / "check" / "work" / "model.onnx").is_file()
    for backend, runs_on in (("onnxruntime", "CPUExecutionProvider"), ("torch", "torch on cpu")):
        infer = steps[f"infer_{backend}"]
        assert infer["runs_on"] == runs_on and infer["case_shape"] == [48, 48, 40]
        assert len(infer["round_s"]) == 1 and infer["median_ms"] > 0 and infer["vs_anchor"] > 0
    assert steps["infer_torch"]["labels_same_as_onnxruntime"] > 0.99
    assert report["anchor"]["ms"] == [395, 592]
    assert "infer_torch:" in result.stdout and "gpu_check.json" in result.stdout


def test_the_real_check_refuses_a_machine_without_a_gpu(tmp_path):
    """The measuring script stops at its first step, in one line, where torch sees no GPU."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("gpu_check: CheckFailed: torch ") and "sees no CUDA GPU" in result.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["steps"]["environment"]["status"] == "failed"
    assert all(report["steps"][name]["status"] == "skipped" for name in STEPS[1:])


@pytest.mark.parametrize(("args", "message"), [
    (["--bogus"], "unknown option '--bogus'"),
    (["--out"], "--out needs a value"),
    (["--dry-run", "--epochs", "0"], "--epochs must be a whole number of at least 1, not '0'"),
    (["--dry-run", "--python", "/nonexistent/python"], "/nonexistent/python lacks one of torch"),
    (["--find-links", "/nonexistent"], "--find-links /nonexistent: no such folder"),
])
def test_bad_options_get_one_line_and_exit_2(args, message):
    result = run(*args, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("gpu_check.sh: ") and message in result.stderr


def test_the_install_needs_a_gpu_and_says_which_step_failed(tmp_path):
    """Without nvidia-smi it stops before installing anything; with a GPU listed but no
    wheel to install, it names the install step that failed."""
    result = run("--out", str(tmp_path / "a"), env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert result.returncode == 2 and "nvidia-smi not found" in result.stderr and not (tmp_path / "a").exists()

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA Test GPU (UUID: GPU-0)'\n")
    (fake / "nvidia-smi").chmod(0o755)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    result = run("--out", str(tmp_path / "b"), "--find-links", str(wheels), "--python", sys.executable,
                 env={"PATH": f"{fake}:{os.environ['PATH']}"}, timeout=180)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "GPU 0: NVIDIA Test GPU" in result.stdout and "== torch" in result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith("gpu_check.sh: install step failed: ")
    assert (tmp_path / "b" / "venv" / "bin" / "python").exists()
