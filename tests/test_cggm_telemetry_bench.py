"""bench/cggm_telemetry.py draws B and head Dice per sequence from a protocol's run folders."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))  # the bench imports real_cv as a sibling
spec = importlib.util.spec_from_file_location("cggm_telemetry", REPO / "bench" / "cggm_telemetry.py")
cggm_telemetry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cggm_telemetry)
ROWS = cggm_telemetry.ROWS


def write_run(folder: Path, b: dict[str, list[float]]) -> None:
    folder.mkdir(parents=True)
    epochs = len(next(iter(b.values())))
    rows = [{"epoch": e + 1, **{f"B/{m}": v[e] for m, v in b.items()},
             **{f"head_dice/{m}": 0.1 * (e + 1) for m in b}} for e in range(epochs)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_each_trained_fold_is_drawn_and_the_second_half_is_averaged(tmp_path):
    row = ROWS["slots-cggm-deficit-dropout"]
    for fold, t1ce in ((0, [1.0, 1.0, 1.2, 1.4]), (1, [1.0, 1.0, 1.0, 1.2])):
        write_run(tmp_path / row.group / f"fold{fold}" / "runs" / f"{row.method}-seed0",
                  {"flair": [1.0, 1.0, 0.8, 0.8], "t1": [1.0] * 4, "t1ce": t1ce, "t2": [1.0] * 4})
    fig, lines = cggm_telemetry.figure(tmp_path, ["slots-cggm-deficit-dropout", "slots-cggm-paper-dropout"], 3)
    t1ce = next(line for line in lines if " B " in line and " t1ce " in line)
    assert "1.200" in t1ce and "2 fold(s)" in t1ce  # (1.3 + 1.1) / 2: the last two epochs of each fold
    assert not any("paper" in line for line in lines)  # a row with no trained fold is left out
    assert len(fig.axes) == 2


def test_no_trained_run_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["cggm_telemetry.py", "--protocol", str(tmp_path), "--results", str(tmp_path)])
    with pytest.raises(SystemExit, match="no trained run"):
        cggm_telemetry.main()
