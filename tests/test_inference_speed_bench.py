"""The inference benchmark runs end to end on a tiny configuration, and its memory process
reports a peak."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "inference_speed.py"
MEMORY_TAG = "MEMORY-JSON "  # bench/inference_speed.py's MEMORY_TAG (not imported: that takes ~10 s)


def test_quick_benchmark_times_both_backends_and_a_memory_process(tmp_path):
    out, keep = tmp_path / "speed.json", tmp_path / "files"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--configs", "a", "--no-memory", "--keep", str(keep),
         "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["settings"]["quick"] and payload["settings"]["threads"] == 2
    assert payload["environment"]["OMP_WAIT_POLICY"] and payload["machine"]["load_average"]
    config = payload["configs"]["a"]
    assert list(payload["configs"]) == ["a"] and not config["spec"]["trained"]
    assert config["case_shape"] == [64, 64, 64] and config["windows_per_case"] >= 1
    flops = config["conv_flops"]
    assert flops["per_window"] > 0 and flops["conv_transpose"] > 0
    # the hooks count what torch's flop counter counts (convolutions only in this network)
    assert abs(flops["per_window"] - flops["flop_counter_per_window"]) <= 1e-6 * flops["per_window"]
    assert config["ort_intra_op_threads"] == {"onnxruntime": 2, "onnxruntime-numpy": 2}
    assert len(config["rounds"]) == 1
    for backend in ("torch", "onnxruntime", "onnxruntime-numpy"):
        timing = config["rounds"][0][backend]
        assert 0 < timing["backend_s"] < timing["case_s"] and timing["windows"] == config["windows_per_case"]
        row = config["summary"][backend]
        assert 0 < row["fraction_of_matmul_case"]["median"] < row["fraction_of_matmul_backend"]["median"] < 2
        assert row["conv_gflops_backend"]["median"] > 0
        assert abs(sum(row["phases_s"][p]["median"] for p in ("read", "sliding window", "invert", "labels",
                                                              "preprocess + rest")) - row["case_s"]["median"]) < 1e-6
    assert config["summary"]["torch"]["ratio_case_vs_torch"]["median"] == 1.0
    assert config["summary"]["onnxruntime"]["ratio_case_vs_monai_chain"]["median"] == 1.0
    assert config["summary"]["onnxruntime-numpy"]["ratio_case_vs_monai_chain"]["median"] > 0
    for backend in ("onnxruntime", "onnxruntime-numpy"):  # the MONAI chain and the numpy chain agree with torch
        parity = config["parity"][backend]
        assert 0.99 <= parity["label_agreement"] <= 1.0 and parity["max_abs_diff_probabilities"] < 1e-3
    assert config["memory"] == {}
    table = out.with_suffix(".md").read_text()
    assert table.startswith("```\n") and "| onnxruntime |" in table and "| torch |" in table and "| onnxruntime-numpy |" in table
    assert table.split("```\n\n", 1)[1] in result.stdout  # the same table on stdout

    # one memory process on the files the run kept
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--one", "a:onnxruntime", "--spec", str(keep / "spec.json")],
        check=False, capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith(MEMORY_TAG))
    memory = json.loads(line[len(MEMORY_TAG):])
    assert memory["target"] == "a:onnxruntime" and memory["cold_case_s"] > 0
    assert memory["peak_rss_mib"] >= memory["rss_after_load_mib"] >= memory["rss_after_imports_mib"] > 0
    assert memory["peak_over_imports_mib"] > 0
