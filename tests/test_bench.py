"""The imbalance benchmark (the demo) runs end to end and writes its report."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_imbalance_benchmark_writes_tables_json_and_plots(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "imbalance.py"), "--tasks", "cls2",
         "--methods", "none,cggm-stable,cggm-paper", "--seeds", "1", "--epochs", "1",
         "--train-size", "320", "--val-size", "200", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cggm-stable" in result.stdout
    report = (out / "results.md").read_text()
    assert "| none |" in report and "| cggm-stable |" in report
    payload = json.loads((out / "results.json").read_text())
    methods = {run["method"] for run in payload["runs"]}
    assert methods == {"none", "cggm-stable", "cggm-paper"}
    png = (out / "cls2_telemetry.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert not list(out.glob(".*.tmp"))  # nothing half-written left behind
