"""Metrics sinks: TensorBoard event files (tensorboardX, no TensorFlow), a JSONL file, console.

Only process 0 writes. Values arrive as plain Python floats, already reduced from (sum, count).
"""

from __future__ import annotations

import json
import pathlib
import time

import jax


class MetricsLogger:
    def __init__(self, workdir: str | pathlib.Path, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = pathlib.Path(workdir)
        self._tb = None
        self._jsonl = None
        if self.enabled:
            from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes

            self.workdir.mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
            self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")

    def write(self, step: int, metrics: dict[str, float], *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        for name, value in metrics.items():
            self._tb.add_scalar(f"{prefix}/{name}", value, step)
        record = {"step": step, "split": prefix, "time": time.time(), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
