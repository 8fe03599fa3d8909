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


def test_the_wheel_carries_the_shipped_models_and_their_cards(wheel):
    """`pip install <wheel>` segments with no --model: the models are package data of
    brats_cggm.models, found through importlib.resources."""
    from brats_cggm import models

    shipped = {f"brats_cggm/models/{m.path.name}" for m in models.available()}
    shipped |= {f"brats_cggm/models/{m.card_path.name}" for m in models.available()}
    assert models.default().name in {m.name for m in models.available()}
    assert shipped <= set(wheel.namelist()), sorted(shipped - set(wheel.namelist()))
    for name in shipped:  # the very bytes of the work tree
        assert wheel.read(name) == (REPO / name).read_bytes(), name
    weights = {f"brats_cggm/raw/weights/{p.name}" for p in (REPO / "brats_cggm/raw/weights").iterdir()}
    assert weights <= set(wheel.namelist()), sorted(weights - set(wheel.namelist()))  # brain extraction, no download
    size_mb = Path(wheel.filename).stat().st_size / 2**20
    print(f"\nwheel: {size_mb:.1f} MB")
    assert size_mb < 48  # three segmentation models (2.3, 3.1 and 35 MB: the four-branch C3), deepbet's two networks 8.6 MB


def _build(hook: str, source: Path, out: Path) -> Path:
    """A PEP 517 build with this environment's setuptools (no index, no isolation)."""
    code = f"from setuptools import build_meta; print(build_meta.{hook}({str(out)!r}))"
    name = subprocess.run([sys.executable, "-c", code], cwd=source, check=True, capture_output=True, text=True,
                          timeout=300).stdout.split()[-1]
    return out / name


def _contents(wheel: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as archive:
        return {n: archive.read(n) for n in archive.namelist() if not n.endswith(".dist-info/RECORD")}


def test_the_sdist_builds_the_same_wheel(tmp_path):
    pytest.importorskip("setuptools", reason="building needs setuptools")
    source = copy_sources(tmp_path / "source")
    direct = _build("build_wheel", source, tmp_path / "direct")
    sdist = _build("build_sdist", source, tmp_path / "sdist")
    shutil.unpack_archive(sdist, tmp_path / "unpacked")
    unpacked = next((tmp_path / "unpacked").iterdir())
    from_sdist = _build("build_wheel", unpacked, tmp_path / "from_sdist")
    ours, theirs = _contents(direct), _contents(from_sdist)
    assert sorted(ours) == sorted(theirs), sorted(set(ours) ^ set(theirs))
    assert [n for n in ours if ours[n] != theirs[n]] == []
