"""The torch-free install: a wheel built from the sources, installed in a clean virtual
environment (``pip install brats_cggm-*.whl``, the base install, no extra), must run ``check``
and ``predict`` (every option) on a phantom and on a real case with no ``--model`` (the shipped
default travels in the wheel), with no torch, MONAI, Gradio or SciPy; a command that needs the
``train`` extra says so in one line (exit 2, no traceback).

It installs from the package index (18-35 s, 233 MB), so it runs where
``BRATS_CGGM_INSTALL_TEST=1`` (``.ci/run`` sets it) and is skipped with that reason
elsewhere. The phantom is written by this (full) environment: ``brats-cggm phantom``
needs the ``train`` extra. Size and time of the install and the wheel's size are printed
(``pytest -s``). Commands run outside the repository, so nothing of the work tree is found.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_packaging import copy_sources
from test_real_cases import REAL

from brats_cggm.data.phantom import write_phantoms

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    os.environ.get("BRATS_CGGM_INSTALL_TEST") != "1",
    reason="builds a clean venv from the package index (~35 s): set BRATS_CGGM_INSTALL_TEST=1 (.ci/run does)",
)
FORBIDDEN = ("torch", "monai", "gradio", "scipy", "torchio", "SimpleITK", "nilearn")


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A clean venv with the base install of a wheel built from a copy of the package's
    sources (so the build leaves nothing in the work tree)."""
    root = tmp_path_factory.mktemp("torch_free")
    source = copy_sources(root / "source")
    env = root / "venv"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    pip = [str(env / "bin" / "pip"), "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "-w", str(root / "dist"), str(source)], check=True, timeout=900)
    wheel = next((root / "dist").glob("brats_cggm-*.whl"))
    subprocess.run([*pip, "install", "--quiet", str(wheel)], check=True, timeout=900)
    seconds = time.perf_counter() - start
    print(f"\nwheel: {wheel.name}, {wheel.stat().st_size / 2**20:.1f} MB")
    listed = subprocess.run([str(env / "bin" / "pip"), "list", "--format", "json"], check=True,
                            capture_output=True, text=True).stdout
    packages = {p["name"].lower(): p["version"] for p in json.loads(listed)}
    print(f"\ntorch-free install: {seconds:.0f} s, {folder_mb(env):.0f} MB, {len(packages)} packages")
    return env, packages


def cli(env: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(env / "bin" / "brats-cggm"), *args], check=False, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}, cwd=env)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_the_install_has_no_torch_and_fits_400_mb(venv):
    env, packages = venv
    assert not [p for p in FORBIDDEN if p.lower() in packages], sorted(packages)
    assert {"onnxruntime", "numpy", "nibabel", "brats-cggm"} <= set(packages)
    assert folder_mb(env) <= 400


def test_the_shipped_models_come_from_the_installed_wheel(venv):
    env, _ = venv
    listed = cli(env, "models").stdout
    assert "brats_cggm_real (default)" in listed and "brats_cggm_phantom_demo" in listed, listed
    card = cli(env, "models", "brats_cggm_real").stdout
    assert card.startswith(f"brats_cggm_real: {env}") and '"format": "brats-cggm-model-card/1"' in card, card


def test_check_and_predict_a_phantom_with_every_option(venv, tmp_path):
    env, _ = venv
    write_phantoms(tmp_path / "cases", 1, size=48, layout="brats2023", seed=5)
    cli(env, "check", str(tmp_path / "cases"))
    out = tmp_path / "out"
    # Shapley values (15 subsets) and mirroring (8 flips) in two calls: together they are 120 passes
    result = cli(env, "predict", "--input", str(tmp_path / "cases"), "--out", str(out), "--contributions", "--method", "shapley", "--probabilities", "--label-scheme", "brats2023")
    summary = json.loads(next(out.glob("*.json")).read_text())
    assert not summary["tta"] and summary["contributions"]["method"] == "shapley", result.stdout
    assert summary["label_scheme"] == "brats2023" and len(summary["files"]["contributions"]) == 4
    assert summary["model"]["source"].startswith(str(env)), summary["model"]  # the wheel's default model
    case = next((tmp_path / "cases").iterdir())
    files = sorted(case.glob("*-t2f.nii.gz"))  # one sequence as a file: a missing-sequence case
    cli(env, "predict", "--input", str(files[0]), "--out", str(tmp_path / "one"), "--tta")
    one = json.loads(next((tmp_path / "one").glob("*.json")).read_text())
    assert one["sequences_used"] == ["flair"] and one["tta"]


def test_the_python_api_imports_no_torch(venv):
    env, _ = venv
    code = (
        "import sys, numpy as np\n"
        "from brats_cggm.inference.segmenter import Segmenter\n"
        "s = Segmenter.load()\n"
        "rng = np.random.default_rng(0)\n"
        "arrays = {m: np.pad(rng.uniform(100, 200, (30, 30, 30)), 5).astype(np.float32) for m in ('flair', 't1', 't1ce', 't2')}\n"
        "p = s.predict_arrays(arrays, np.eye(4), contributions='occlusion')\n"
        "assert p.labels.shape == (40, 40, 40) and s.chain == 'numpy'\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'monai', 'scipy')))\n"
    )
    result = subprocess.run([str(env / "bin" / "python"), "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


@pytest.mark.parametrize("args", [["train", "--out", "run"], ["phantom", "--out", "x", "--cases", "1"],
                                  ["predict", "--model", "RUN", "--input", "x", "--out", "y"]])
def test_a_command_that_needs_torch_names_the_extra(venv, tmp_path, args):
    env, _ = venv
    if "RUN" in args:  # a run folder predicts through torch
        (tmp_path / "run" / "checkpoints").mkdir(parents=True)
        args = [str(tmp_path / "run") if a == "RUN" else a for a in args]
    result = cli(env, *args, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'brats-cggm[train]'" in lines[0] and "Traceback" not in result.stderr


def test_the_app_is_brats_cggm_app_and_names_its_extra(venv):
    """The web app installs as brats_cggm_app (no top-level `apps`); without Gradio its command
    says which extra brings it."""
    env, _ = venv
    code = "import importlib.util as u; print(u.find_spec('apps') is None, u.find_spec('brats_cggm_app') is not None)"
    # -I: the installed packages only (without it the repository's own apps/ folder, in the
    # working directory, would be found as a namespace package)
    found = subprocess.run([str(env / "bin" / "python"), "-I", "-c", code], check=True, capture_output=True, text=True)
    assert found.stdout.split() == ["True", "True"], found.stdout
    result = cli(env, "app", check=False)
    assert result.returncode == 2 and "pip install 'brats-cggm[app]'" in result.stderr, result.stdout + result.stderr


@pytest.mark.skipif(not REAL.is_dir(), reason=f"no real BraTS cases at {REAL} (a fresh clone has none)")
def test_a_real_case_with_a_flipped_direction(venv, tmp_path):
    """BraTS-MET-00110-000 (RAS where the others are LPS): the label map on its exact grid."""
    env, _ = venv
    case = REAL / "brats2023" / "BraTS-MET-00110-000"
    cli(env, "check", str(case.parent))
    files = [a for f in sorted(case.glob("*.nii.gz")) for a in ("--input", str(f))]
    cli(env, "predict", *files, "--out", str(tmp_path))
    labels = nib.load(tmp_path / f"{case.name}.nii.gz")
    source = nib.load(next(case.glob("*-t1c.nii.gz")))
    assert labels.shape == source.shape and np.allclose(labels.affine, source.affine, atol=1e-5)
    assert int((np.asarray(labels.dataobj) > 0).sum()) > 1000  # a metastasis is found
