"""One writer per train workdir: a lock file naming its holder (PID, host), released at exit.

    with WorkdirLock("runs/tiny"):      # raises LockedError while another run holds it
        ...

The lock is an exclusive `flock` on WORKDIR/.lock, so the kernel drops it when the holder dies
however it dies (SIGKILL included): a lock file left behind by a dead run is stale and simply
taken over. The file's text (PID, host, start time) is only there to name the holder in the
message. Re-entrant within one process (the CLI takes it before building the trainer, which
takes it again). On a filesystem without flock (some network mounts) the PID is checked instead,
which detects a dead holder on the same host only.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pathlib
import socket
import time

from data_pipeline.fileio import pid_alive
from llada_jax.errors import UserError

LOCK_NAME = ".lock"
_HELD: dict[pathlib.Path, list] = {}  # resolved lock path -> [file object, nesting depth]


class LockedError(UserError):
    """The workdir is in use by another run."""


def _holder_text() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n"


def _describe(text: str) -> str:
    try:
        info = json.loads(text)
        return f"PID {info['pid']} on host {info['host']} (since {info['started']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


def _flock_unsupported_holder(f) -> str | None:
    """Without flock: the recorded holder's text if it may be alive (on another host it cannot
    be checked), else None."""
    f.seek(0)
    text = f.read()
    try:
        info = json.loads(text)
    except ValueError:
        return None
    same_host = info.get("host") == socket.gethostname()
    if same_host and (info.get("pid") == os.getpid() or not pid_alive(int(info.get("pid", -1)))):
        return None  # a dead holder on this host: stale
    return text


class WorkdirLock:
    def __init__(self, workdir: str | pathlib.Path):
        self.path = (pathlib.Path(workdir) / LOCK_NAME).absolute()

    def acquire(self) -> None:
        held = _HELD.get(self.path)
        if held is not None:
            held[1] += 1
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")
        try:
            holder = self._holder(f)
        except BaseException:
            f.close()
            raise
        if holder is not None:
            f.close()
            raise LockedError(
                f"{self.path.parent} is in use by another run: {_describe(holder)} holds "
                f"{self.path}. Wait for it to finish (or stop it), or pick another --workdir; "
                f"two runs in one workdir would mix their checkpoints")
        f.seek(0)
        f.truncate()
        f.write(_holder_text())
        f.flush()
        _HELD[self.path] = [f, 1]

    @staticmethod
    def _holder(f) -> str | None:
        """Takes the flock of open file `f`: None when taken, else the holder's text."""
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):
                f.seek(0)
                return f.read()
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP):
                return _flock_unsupported_holder(f)
            raise

    def release(self) -> None:
        held = _HELD.get(self.path)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self.path]
            held[0].truncate(0)  # no holder named: a host without flock sees the lock free
            held[0].close()  # closing drops the flock

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
