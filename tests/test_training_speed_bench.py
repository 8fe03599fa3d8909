"""The training-step benchmark runs end to end, and its step is the trainer's step."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

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
    assert list(rows) == list(bench.VARIANTS)
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
