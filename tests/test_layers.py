"""Import direction: training knows neither inference nor export, inference never imports
export, and the model card's module imports nothing that needs torch when it loads (the
torch-free install reads cards)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "brats_cggm"


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize(("layer", "forbidden"), [
    ("training", ("brats_cggm.export", "brats_cggm.inference")),
    ("inference", ("brats_cggm.export",)),
])
def test_no_import_goes_back_up(layer, forbidden):
    for path in sorted((PACKAGE / layer).glob("*.py")):
        wrong = [m for m in imported(path) if m.startswith(forbidden)]
        assert not wrong, f"{path.name} imports {wrong}"


def test_the_card_module_loads_without_torch():
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'monai', 'scipy'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import brats_cggm.inference.card, brats_cggm.inference.segmenter\n"
    )
    done = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
