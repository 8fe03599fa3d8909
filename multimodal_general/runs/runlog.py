"""What a run records as it trains: per-epoch metrics (JSONL, CSV, TensorBoard) and
per-step telemetry (CSV). Only rank 0 of a distributed run writes.

On resume, rows written after the checkpoint (a run killed between logging and saving)
are dropped, so that the files describe exactly the run that continues.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from multimodal_general.io import atomic_write_text


class Logbook:
    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int | None = None,
                 resume_epoch: int | None = None) -> None:
        self.run_dir, self.enabled = run_dir, enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self.telemetry_path = run_dir / "telemetry.csv"
        self._telemetry_columns: list[str] | None = None
        self._telemetry_rows: list[dict[str, Any]] = []
        self._tensorboard = None
        if not enabled:
            return
        if resume_epoch is not None:
            self._truncate(resume_epoch, resume_step or 0)
        else:
            for path in (self.metrics_path, self.telemetry_path, run_dir / "metrics.csv"):
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ writing
    def step(self, row: dict[str, Any]) -> None:
        """One optimizer step's telemetry; written to disk by :meth:`flush`."""
        if self.enabled:
            self._telemetry_rows.append(row)

    def epoch(self, row: dict[str, Any]) -> None:
        """One finished epoch's metrics, written at once (with the step telemetry so far)."""
        if not self.enabled:
            return
        self.flush()
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        self._write_csv()
        writer = self._writer()
        if writer is not None:
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)) and math.isfinite(value):
                    writer.add_scalar(key, value, row["epoch"])
            writer.flush()

    def flush(self) -> None:
        if not (self.enabled and self._telemetry_rows):
            return
        if self._telemetry_columns is None:
            self._telemetry_columns = self._existing_columns() or list(self._telemetry_rows[0])
        new_file = not self.telemetry_path.exists()
        with self.telemetry_path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, self._telemetry_columns, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerows(self._telemetry_rows)
        self._telemetry_rows.clear()

    def close(self) -> None:
        self.flush()
        if self._tensorboard is not None:
            self._tensorboard.close()

    def metrics(self) -> list[dict[str, Any]]:
        """The epoch rows written so far; a line cut short by a killed process is skipped."""
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    # ---------------------------------------------------------------- internals
    def _writer(self):
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency; tolerate its absence
                return None
            self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._tensorboard

    def _write_csv(self) -> None:
        rows = self.metrics()
        columns = list(dict.fromkeys(key for row in rows for key in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.run_dir / "metrics.csv", text.getvalue())

    def _existing_columns(self) -> list[str] | None:
        if not self.telemetry_path.exists():
            return None
        with self.telemetry_path.open(newline="") as handle:
            return next(csv.reader(handle), None)

    def _truncate(self, epoch: int, step: int) -> None:
        kept = [row for row in self.metrics() if row["epoch"] <= epoch]
        atomic_write_text(self.metrics_path, "".join(json.dumps(row) + "\n" for row in kept))
        if self.telemetry_path.exists():
            with self.telemetry_path.open(newline="") as handle:
                reader = csv.DictReader(handle)
                columns, rows = reader.fieldnames, [r for r in reader if _step_of(r) <= step]
            text = io.StringIO()
            writer = csv.DictWriter(text, columns or [])
            writer.writeheader()
            writer.writerows(rows)
            atomic_write_text(self.telemetry_path, text.getvalue())


def _step_of(row: dict[str, Any]) -> float:
    """The step of a telemetry row; infinity for a row cut short by a killed process."""
    try:
        return float(row["step"]) if None not in row.values() else math.inf
    except (TypeError, ValueError):
        return math.inf
