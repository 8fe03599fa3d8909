"""What ``pip install brats-cggm`` puts on sys.path: a wheel built from a copy of the sources
holds the three packages (brats_cggm, multimodal_general and the web app's brats_cggm_app,
from the apps/ folder), no top-level ``apps`` package (a name other projects use too), and
the two console scripts.

The wheel is built without build isolation (from this environment's setuptools, no index),
a few seconds."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def copy_sources(source: Path) -> Path:
    """What the package is built from, copied to ``source`` (so the build leaves nothing in
    the work tree)."""
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("brats_cggm", "multimodal_general", "apps"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return source


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    root = tmp_path_factory.mktemp("wheel")
    source = copy_sources(root / "source")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(root / "dist"), str(source)], check=True, timeout=300)
    return zipfile.ZipFile(next((root / "dist").glob("brats_cggm-*.whl")))


def test_the_wheel_installs_the_app_as_brats_cggm_app_and_no_apps_package(wheel):
    names = wheel.namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"brats_cggm", "multimodal_general", "brats_cggm_app"}, sorted(top)
    app = {name for name in names if name.startswith("brats_cggm_app/")}
    assert {f"brats_cggm_app/{m}.py" for m in ("__init__", "cli", "service", "ui", "views")} <= app, sorted(app)


def test_the_console_scripts_point_at_the_app_and_the_general_cli(wheel):
    entry_points = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    text = wheel.read(entry_points).decode()
    assert "brats-cggm = brats_cggm_app.cli:main" in text, text
    assert "multimodal-general = multimodal_general.cli:main" in text, text
