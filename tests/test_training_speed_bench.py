"""The training-step benchmark runs end to end, and its step is the trainer's step."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "training_speed.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("training_speed_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_times_every_variant_and_writes_json_and_markdown(tmp_path):
    out = tmp_path / "speed.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--patch", "32", "--batch", "1", "--repeats", "1", "--warmup", "0",
         "--no-memory", "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(out.read_text())
    bench = _load_bench()
    rows = {row["variant"]: row for row in payload["rows"]}
    assert list(rows) == [v for v in bench.VARIANTS if v not in bench.SCREEN]  # the screen's only when asked
    for row in rows.values():
        assert len(row["step_s"]) == 1 and row["step_s"][0] > 0 and row["median_step_s"] > 0
        assert row["params"] > 0 and row["memory"] is None
        assert row["ratio_vs_baseline"]["median"] > 0 and row["ratio_vs_early_fusion"]["median"] > 0
    assert rows["mb-none"]["ratio_vs_baseline"]["median"] == 1.0
    assert rows["mb-none"]["head_params"] > 0 and rows["ef-small-none"]["head_params"] == 0
    assert payload["settings"]["patch"] == 32 and payload["machine"]["load_average"]
    table = out.with_suffix(".md").read_text()
    assert table.startswith("```\n") and all(f"| {label} |" in table for label in rows)
    assert table.split("```\n\n", 1)[1] in result.stdout  # the same table on stdout
    assert not list(tmp_path.glob(".*.tmp"))


def test_memory_process_reports_a_positive_step_peak():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--one", "ef-small-none", "--patch", "32", "--batch", "1",
         "--memory-steps", "1"],
        check=False, capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    bench = _load_bench()
    line = next(line for line in result.stdout.splitlines() if line.startswith(bench.MEMORY_TAG))
    memory = json.loads(line[len(bench.MEMORY_TAG):])
    assert memory["variant"] == "ef-small-none" and memory["peak_rss_mib"] >= memory["rss_before_mib"] > 0
    if memory["peak_reset"]:
        assert memory["step_peak_mib"] > 0


def test_the_screen_candidates_build_as_declared_and_get_epochs_at_equal_wall_time(capsys):
    """Issue 24's four candidates per network (no steps timed: their builds, patches and budget)."""
    bench = _load_bench()
    assert bench.variant_patch("screen-slots-c4", 64) == 96 and bench.variant_patch("screen-ef-c4", 32) == 48
    assert bench.variant_patch("screen-slots-c3", 64) == 64
    widths = {label: list(bench.build(label, 64).net.channels) for label in bench.SCREEN}
    for net in ("slots", "ef"):
        assert widths[f"screen-{net}-c1"] == widths[f"screen-{net}-c4"] == [8, 16, 32, 64]
        assert widths[f"screen-{net}-c2"] == [16, 32, 64, 128] and widths[f"screen-{net}-c3"] == [8, 16, 32, 64, 128]
    assert bench.build("screen-slots-c1", 64).balancer is None  # no heads: joint training at its cost
    # equal wall time: a step twice as long gets half the epochs of the reference's 150
    measured = {"screen-slots-c1": {"step_s": [1.0, 1.2]}, "screen-ef-c2": {"step_s": [2.0, 2.4]},
                "mb-none": {"step_s": [0.5, 0.6]}}
    assert bench.screen_epochs(measured, "screen-ef-c2") == 75 and bench.screen_epochs(measured, "mb-none") is None
    assert bench.screen_epochs({"screen-ef-c2": {"step_s": [2.0]}}, "screen-ef-c2") is None
    with pytest.raises(SystemExit) as refused:
        bench.parse_args(["--patch", "48", "--variants", "screen-ef-c3"])
    assert refused.value.code == 2 and "--patch 48 is too small for screen-ef-c3" in capsys.readouterr().err
