"""Benchmarks and runs record where their numbers came from."""

import re

from multimodal_general.experiments.provenance import provenance, versions


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

    from multimodal_general.training.runtime import keep_freed_memory

    accepted = keep_freed_memory()
    assert accepted is (platform.libc_ver()[0] == "glibc")
