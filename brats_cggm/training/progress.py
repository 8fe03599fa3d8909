"""The per-epoch progress bar of training: steps, loss (running mean) and seconds per step."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import TextColumn

from multimodal_general.cli_support import progress_bar


class EpochProgress:
    """Adapter the trainer calls: ``start`` an epoch, ``advance`` per step, ``finish``."""

    def __init__(self, console: Console) -> None:
        self.bar = progress_bar(console, transient=True, extra=(
            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[speed]:.2f} s/step")))
        self._loss_sum, self._count, self._started = 0.0, 0, 0.0

    def start(self, description: str, total: int, completed: int = 0):
        self._loss_sum, self._count, self._started = 0.0, 0, time.perf_counter()
        self.bar.start()
        return self.bar.add_task(description, total=total, completed=completed, loss=float("nan"), speed=0.0)

    def advance(self, task, loss: float) -> None:
        self._loss_sum += loss
        self._count += 1
        speed = (time.perf_counter() - self._started) / self._count
        self.bar.update(task, advance=1, loss=self._loss_sum / self._count, speed=speed)

    def finish(self, task) -> None:
        self.bar.remove_task(task)
        self.bar.stop()
