"""What a run records (multimodal_general.runs): where its numbers came from, without torch
until it is needed."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from multimodal_general.runs import provenance as provenance_module
from multimodal_general.runs.provenance import git_revision, provenance, versions

REPO = Path(__file__).resolve().parents[1]


def test_provenance_names_command_revision_machine_and_versions():
    record = provenance("numpy", "no-such-package-xyz")
    assert record["command"] and re.match(r"\d{4}-\d\d-\d\dT", record["date"])
    assert record["git"] is None or re.fullmatch(r"[0-9a-f]{4,40}(\+dirty)?", record["git"])
    assert record["machine"]["cpus"] >= 1 and len(record["machine"]["load_average"]) == 3
    assert record["versions"]["torch"] and record["versions"]["numpy"]
    assert record["versions"]["no-such-package-xyz"] is None
    assert versions("torch")["torch"].startswith("2.")


def test_keep_freed_memory_is_accepted_by_glibc():
    import platform

    from multimodal_general.runs.runtime import keep_freed_memory

    accepted = keep_freed_memory()
    assert accepted is (platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize("module", ["multimodal_general.runs", *(f"multimodal_general.runs.{name}" for name in
                                                                  ("series", "runlog", "plots", "runtime", "provenance"))])
def test_importing_the_run_records_does_not_import_torch(module):
    check = f"import sys, {module}; assert 'torch' not in sys.modules, sorted(sys.modules)"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_revision_is_read_from_the_checkout_of_the_code_and_none_without_one(tmp_path, monkeypatch):
    checkout = provenance_module.source_checkout()
    assert checkout is None or (checkout / "multimodal_general" / "runs" / "provenance.py").is_file()
    assert git_revision(None) is None
    monkeypatch.setattr(provenance_module, "__file__", str(tmp_path / "multimodal_general" / "runs" / "x.py"))
    assert provenance_module.source_checkout() is None
