"""Input paths that are local files or Beam filesystem URLs (`gs://`, `s3://`, ...).

The Beam route (beam_pipeline.py) runs on workers that share no local disk, so its dump files and
tokenizers may be bucket paths: those are read through Apache Beam's FileSystems (gs:// needs
apache-beam[gcp]). Local paths never import Beam.
"""

from __future__ import annotations

import glob
import os
import tempfile


def is_remote(path: str) -> bool:
    return "://" in path


def _fs():
    from apache_beam.io.filesystems import FileSystems
    return FileSystems


def open_read(path: str):
    """A binary file object with seek and read."""
    if not is_remote(path):
        return open(path, "rb")
    from apache_beam.io.filesystem import CompressionTypes
    return _fs().open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def size(path: str) -> int:
    if not is_remote(path):
        return os.path.getsize(path)
    return _fs().match([path])[0].metadata_list[0].size_in_bytes


def expand(pattern: str) -> list[str]:
    """Sorted files matching a path or glob."""
    if is_remote(pattern):
        return sorted(m.path for m in _fs().match([pattern])[0].metadata_list)
    matched = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    return [m for m in matched if os.path.isfile(m)]


def local_copy(path: str) -> str:
    """A local path holding `path` (a file, or a directory's files): itself if local, else a
    copy in a temporary directory (kept for the process's life: tokenizers are read once)."""
    if not is_remote(path):
        return path
    fs = _fs()
    local = tempfile.mkdtemp(prefix="llada-jax-")
    files = fs.match([path.rstrip("/") + "/*"])[0].metadata_list or fs.match([path])[0].metadata_list
    for m in files:
        with fs.open(m.path) as src, open(os.path.join(local, os.path.basename(m.path)), "wb") as f:
            f.write(src.read())
    single = len(files) == 1 and files[0].path == path
    return os.path.join(local, os.path.basename(path)) if single else local


def check_output(path: str, flag: str, *, kind: str) -> None:
    """Refuses, before any work, an output `path` (given as `flag`) that cannot be written:
    `kind` "dir" or "file" already existing as the other kind, a parent that is a file, or a
    place where no file can be created (read-only, no permission). Bucket paths pass."""
    from data_pipeline.errors import OutputError

    if is_remote(path):
        return
    if os.path.exists(path) and os.path.isdir(path) != (kind == "dir"):
        raise OutputError(f"{flag} {path} is a {'folder' if os.path.isdir(path) else 'file'}; "
                          f"{'a folder' if kind == 'dir' else 'a file name'} is expected")
    place = os.path.abspath(path if kind == "dir" and os.path.isdir(path)
                            else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(place):
        place = os.path.dirname(place)
    if not os.path.isdir(place):
        raise OutputError(f"{flag} {path}: {place} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=place).close()
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot write in {place} ({e.strerror}); choose "
                          f"another place") from None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` (on this host) still runs: its files are not litter yet."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True
