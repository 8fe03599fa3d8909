"""The shape of the code (docs/DESIGN: short functions): no function of the packages, the app
or the benchmarks is longer than :data:`MAX_LINES` lines, counted over its whole definition,
decorators and docstring included (read with ``ast``, nothing imported)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("multimodal_general", "brats_cggm", "apps", "bench")
MAX_LINES = 70


def function_lengths(path: Path, root: Path = REPO) -> list[tuple[str, int]]:
    """``(where, lines)`` for every function (methods and nested ones too) defined in ``path``
    (named by its path from ``root``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([d.lineno for d in node.decorator_list] + [node.lineno])
            found.append((f"{path.relative_to(root)}:{node.lineno} {node.name}", node.end_lineno - first + 1))
    return found


def test_no_function_is_longer_than_the_limit():
    files = sorted(p for folder in FOLDERS for p in (REPO / folder).rglob("*.py"))
    assert files, "no sources found"
    long = [f"{where} ({lines} lines)" for path in files for where, lines in function_lengths(path) if lines > MAX_LINES]
    assert not long, f"functions over {MAX_LINES} lines (split them by job): " + "; ".join(long)


def test_the_count_includes_decorators_and_docstring(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text('@decorator\ndef f():\n    """doc\n    string"""\n    return 1\n')
    assert function_lengths(source, tmp_path) == [("probe.py:2 f", 5)]
