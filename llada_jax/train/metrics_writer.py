"""Metrics sinks: TensorBoard event files (tensorboardX, no TensorFlow), a JSONL file, console.

Only process 0 writes. Values arrive as plain Python floats, already reduced from (sum, count).
A run resumed from step S first drops what an earlier run logged after S (it is replayed), so
metrics.jsonl and the curves hold each step once.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax


class MetricsLogger:
    def __init__(self, workdir: str | pathlib.Path, *, enabled: bool | None = None,
                 resume_step: int = 0):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = pathlib.Path(workdir)
        self._tb = None
        self._jsonl = None
        if self.enabled:
            from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes

            self.workdir.mkdir(parents=True, exist_ok=True)
            # purge_step: TensorBoard hides the earlier events at steps >= it
            self._tb = SummaryWriter(str(self.workdir / "tensorboard"),
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
