"""The raw cases a user points at: a folder with one sub-folder per case, one case folder, or
a ``.zip`` of either (extracted into a temporary folder that lives as long as the context)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from brats_cggm.errors import BadInputFile
from brats_cggm.raw.series import group_cases, unpack


@contextmanager
def raw_cases(paths: list[Path]) -> Iterator[list[tuple[str, Path]]]:
    """``[(case id, folder)]`` over every path given (folders or .zip files)."""
    with tempfile.TemporaryDirectory(prefix="brats-cggm-raw-") as scratch:
        found: list[tuple[str, Path]] = []
        for k, path in enumerate(paths):
            path = Path(path)
            root = unpack(path, Path(scratch) / str(k))
            if not root.is_dir():
                raise BadInputFile(path, "is neither a folder nor a .zip archive")
            cases = group_cases(root)
            if path.suffix.lower() == ".zip" and len(cases) == 1 and cases[0][1] == root:
                cases = [(path.stem, root)]  # one case zipped: named after the archive
            found += cases
        ids = [case_id for case_id, _ in found]
        duplicate = next((i for i in ids if ids.count(i) > 1), None)
        if duplicate:
            raise BadInputFile(paths[0], f"two cases are named {duplicate}: give their folders different names")
        yield found
