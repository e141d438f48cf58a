"""Metrics sinks: TensorBoard event files (tensorboardX, no TensorFlow) and a JSONL file.

The one TensorBoard writer of the project: `MetricsLogger` (train's running metrics, process 0
only) and `write_scalars` (the one-shot results of eval and speculate). Values arrive as plain
Python floats, already reduced from (sum, count). A run resumed from step S first drops what an
earlier run logged after S (it is replayed), so metrics.jsonl and the curves hold each step once.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Iterable

import jax


def _summary_writer(logdir: str | pathlib.Path, **options):
    from tensorboardX import SummaryWriter  # imported lazily: only a process that writes needs it

    return SummaryWriter(str(logdir), **options)


def write_scalars(logdir: str | pathlib.Path, scalars: Iterable[tuple[str, float, int]]) -> None:
    """(tag, value, step) triples into TensorBoard event files under `logdir`."""
    with _summary_writer(logdir) as writer:
        for tag, value, step in scalars:
            writer.add_scalar(tag, value, step)


class MetricsLogger:
    def __init__(self, workdir: str | pathlib.Path, *, enabled: bool | None = None,
                 resume_step: int = 0):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = pathlib.Path(workdir)
        self._tb = None
        self._jsonl = None
        if self.enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            # purge_step: TensorBoard hides the earlier events at steps >= it
            self._tb = _summary_writer(self.workdir / "tensorboard",
                                       purge_step=resume_step + 1 if resume_step else None)
            _drop_after(self.workdir / "metrics.jsonl", resume_step)
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


def _drop_after(path: pathlib.Path, step: int) -> None:
    """Rewrites `path` without the records after `step` (and without a torn last line)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if record.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)
