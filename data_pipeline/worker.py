"""The worker side of `preprocess`: each spawned process receives the main process's Converter
(pickled: its vocabularies and id map, without re-reading the tokenizers, which takes seconds
for a 128k vocabulary) and converts the records it is sent, mapping their bytes from the input
file itself. It imports only the conversion modules (not TFDS), so workers start fast.

A worker exits as soon as its parent is gone (killed by SIGKILL or SIGTERM, which give the pool
no chance to stop it): a watchdog thread sees the parent PID change."""

from __future__ import annotations

import os
import threading
import time

from data_pipeline.convert import Converter, Result
from data_pipeline.reader import RecordSpan

_CONVERTER: Converter | None = None
PARENT_POLL_S = 0.5


def init(converter: Converter, parent: int) -> None:
    """`parent`: the PID of the process that started the pool (passed, not read here: it may
    have died while this worker was starting)."""
    global _CONVERTER
    _CONVERTER = converter
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)  # orphaned: nobody will read the results


def convert(span: RecordSpan) -> Result:
    return _CONVERTER.convert(span.map())
