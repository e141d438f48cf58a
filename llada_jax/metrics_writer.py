"""Metrics sinks: TensorBoard event files (tensorboardX, no TensorFlow) and a JSONL file.

The one TensorBoard writer of the project: `MetricsLogger` (train's running metrics, process 0
only) and `write_scalars` (the one-shot results of eval and speculate). Values arrive as plain
Python floats, already reduced from (sum, count).
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Iterable

import jax


def _summary_writer(logdir: str | pathlib.Path):
    from tensorboardX import SummaryWriter  # imported lazily: only a process that writes needs it

    return SummaryWriter(str(logdir))


def write_scalars(logdir: str | pathlib.Path, scalars: Iterable[tuple[str, float, int]]) -> None:
    """(tag, value, step) triples into TensorBoard event files under `logdir`."""
    with _summary_writer(logdir) as writer:
        for tag, value, step in scalars:
            writer.add_scalar(tag, value, step)


class MetricsLogger:
    def __init__(self, workdir: str | pathlib.Path, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = pathlib.Path(workdir)
        self._tb = None
        self._jsonl = None
        if self.enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._tb = _summary_writer(self.workdir / "tensorboard")
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
