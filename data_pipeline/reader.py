"""Stream the records of seed-format teacher dumps (a JSON array, or JSONL) with bounded memory.

The reader only *frames* records: it finds where each top-level element starts and ends in its
file (`iter_record_spans`); parsing happens later, in the worker processes, which read the bytes
themselves (`RecordSpan.read`). Framing holds a read chunk plus the longest string at most.

A JSON array is framed by a bracket scanner whose inner loop is a regex that skips strings,
scalars and balanced groups up to three levels deep in one C call (a whole `logits` entry), so
Python only sees a few brackets per teacher token. The regex stops at each `"full_logits": [`
text; when that array holds only numbers (no brackets, braces or quotes up to its `]`, checked
with memchr) it is skipped whole instead of stepped over byte by byte: 1 GB/s+ instead of 200 MB/s.
Where those arrays lie is handed on with the record (`RecordSpan.arrays`), so the worker parses
them without looking for them again.
Framing errors (a truncated file, unbalanced brackets, trailing garbage) are returned as records
with an `error`, so they are counted and reported like any other bad record.

JSONL (any file whose first non-blank byte is `{`): one record per non-blank line.

CSV (a `.csv` file, as the original's generator writes them with Python's csv module): a header
naming the columns `prompt`, `response` and `logits_data` (the JSON text of the seed format's
`logits` list), then one record per row. Rows are framed by a quote-aware newline scan (a newline
ends a row where the row holds an even number of `"`), in chunks; the worker parses its row with
the csv module and hands on the record as seed-format JSON text, so a CSV record gets exactly
the checks and skip reasons of a JSON one. A row that does not parse is `invalid_csv`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import mmap
import re
import sys
from collections.abc import Iterator

from data_pipeline import fileio
from data_pipeline.errors import DataError

_STR = rb'"(?:[^"\\]++|\\.)*+"'
_ATOM = rb'[^"\[\]{}]++|' + _STR


def _balanced(depth: int) -> bytes:
    """Regex body matching content with balanced brackets nested at most `depth` levels."""
    inner = rb'(?:' + _ATOM + rb')*+'
    for _ in range(depth):
        inner = rb'(?:' + _ATOM + rb'|\{' + inner + rb'\}|\[' + inner + rb'\])*+'
    return inner


# Everything up to the next bracket or quote that the regex could not consume as a whole.
_SKIP = re.compile(_balanced(3), re.S)
_WS = re.compile(rb'[ \t\r\n]*+')
_SCALAR = re.compile(rb'(?:[^"\[\]{},]++|' + _STR + rb')*+', re.S)
_CLOSERS = {ord(']'): ord('['), ord('}'): ord('{')}
_STRING = re.compile(_STR, re.S)
_NONBLANK = re.compile(rb"[^ \t\r\n]")
# The text that opens a `full_logits` array (when it is not inside a string).
FULL_LOGITS_KEY = re.compile(rb'"full_logits"[ \t\r\n]*:[ \t\r\n]*\[')


CSV_COLUMNS = ("prompt", "response", "logits_data")
csv.field_size_limit(sys.maxsize)  # one full-logits row is megabytes of text


@dataclasses.dataclass(frozen=True)
class RawRecord:
    """One framed record: raw JSON bytes, or a framing error (`text` None, `error` set, and the
    skip reason it counts as). The record is text[start:]: `start` is 0 except for a mapped
    record (RecordSpan.map), whose `text` is a read-only mmap from the page boundary before it."""
    file: str
    index: int  # 0-based position of the record in its file
    text: bytes | mmap.mmap | None
    error: str | None = None
    reason: str = "invalid_json"
    start: int = 0
    arrays: tuple[tuple[int, int], ...] | None = None  # RecordSpan.arrays, as offsets in text


@dataclasses.dataclass(frozen=True)
class RecordSpan:
    """Where one framed record lies in its file, bytes [start, end), or a framing error. Workers
    read the bytes themselves, so records never pass through the main process's pipes."""
    file: str
    index: int
    start: int
    end: int
    error: str | None = None
    csv_columns: tuple[int, ...] | None = None  # a CSV row: where prompt, response, logits_data are
    # Of a JSON array's element: [start, end) file offsets of each `full_logits` value the framer
    # found to be an array without brackets, braces or strings (the worker then need not look).
    arrays: tuple[tuple[int, int], ...] | None = None

    def _arrays_from(self, text_start: int) -> tuple[tuple[int, int], ...] | None:
        if self.arrays is None:
            return None
        shift = text_start - self.start
        return tuple((a + shift, b + shift) for a, b in self.arrays)

    def read(self) -> RawRecord:
        if self.error:
            return RawRecord(self.file, self.index, None, self.error,
                             "invalid_csv" if self.csv_columns else "invalid_json")
        with fileio.open_read(self.file) as f:
            f.seek(self.start)
            text = f.read(self.end - self.start)
        if self.csv_columns is None:
            return RawRecord(self.file, self.index, text, arrays=self._arrays_from(0))
        return _csv_record(self.file, self.index, text, self.csv_columns)

    def map(self) -> RawRecord:
        """read() without copying: a local JSON / JSONL record is mapped from the page cache.

        Reading a 100 MB record into a fresh bytes object costs a third of its parse here (a
        copy, and a page fault per 4 KiB of new memory); a mapping costs a tenth of that. CSV
        rows (re-encoded by the worker) and bucket paths are read."""
        if self.error or self.csv_columns is not None or fileio.is_remote(self.file):
            return self.read()
        base = self.start - self.start % mmap.ALLOCATIONGRANULARITY
        with open(self.file, "rb") as f:
            view = mmap.mmap(f.fileno(), self.end - base, access=mmap.ACCESS_READ, offset=base)
        return RawRecord(self.file, self.index, view, start=self.start - base,
                         arrays=self._arrays_from(self.start - base))


def expand_inputs(patterns: list[str]) -> list[str]:
    """Input paths and globs -> sorted unique files; ValueError naming a pattern with none."""
    files: list[str] = []
    for pattern in patterns:
        matched = fileio.expand(pattern)
        if not matched:
            raise DataError(f"--input {pattern!r}: no such file")
        files.extend(m for m in matched if m not in files)
    return files


def iter_raw_records(path: str, chunk_bytes: int = 1 << 20) -> Iterator[RawRecord]:
    """Yields every record of one file in order (framing errors included, as records)."""
    return (span.read() for span in iter_record_spans(path, chunk_bytes))


def iter_record_spans(path: str, chunk_bytes: int = 1 << 20) -> Iterator[RecordSpan]:
    """Yields where every record of one file lies, in order (framing errors included)."""
    if is_csv(path):
        yield from _iter_csv_rows(path, chunk_bytes)
        return
    with fileio.open_read(path) as f:
        head = f.read(chunk_bytes)
        while _WS.match(head).end() == len(head) and (more := f.read(chunk_bytes)):
            head += more
        start = _WS.match(head).end()
        if start < len(head) and head[start] == ord('['):
            yield from _ArrayFramer(path, f, head, start + 1, chunk_bytes).records()
        else:
            f.seek(0)
            yield from _iter_lines(path, f)


def _iter_lines(path: str, f) -> Iterator[RecordSpan]:
    index = offset = 0
    for line in f:
        if line.strip():
            yield RecordSpan(path, index, offset, offset + len(line))
            index += 1
        offset += len(line)


def is_csv(path: str) -> bool:
    return path.lower().endswith(".csv")


def csv_header(path: str) -> tuple[tuple[int, ...], int]:
    """(column index of prompt, response, logits_data; byte length of the header line) of a CSV
    input. ValueError naming the file when the header lacks one of them."""
    with fileio.open_read(path) as f:
        line = f.readline()
    try:
        names = next(csv.reader([line.decode("utf-8-sig")]), [])
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: the first line is not a CSV header ({e})") from None
    missing = [c for c in CSV_COLUMNS if c not in names]
    if missing:
        raise DataError(f"{path}: the CSV header {names} lacks {missing}; the columns must be "
                         f"{', '.join(CSV_COLUMNS)} (logits_data: the JSON of the `logits` list)")
    return tuple(names.index(c) for c in CSV_COLUMNS), len(line)


def _iter_csv_rows(path: str, chunk_bytes: int) -> Iterator[RecordSpan]:
    """Row spans by offsets alone: a row is never held whole, however long it is."""
    columns, offset = csv_header(path)
    index = 0
    with fileio.open_read(path) as f:
        f.seek(offset)
        row, quotes, blank = offset, 0, True  # where the row starts, its `"`s, only whitespace?
        while chunk := f.read(chunk_bytes):
            pos = 0
            while (nl := chunk.find(b"\n", pos)) >= 0:
                quotes += chunk.count(b'"', pos, nl)
                blank = blank and not _NONBLANK.search(chunk, pos, nl)
                pos = nl + 1
                if quotes % 2 == 0:  # else the newline is inside a quoted field
                    if not blank:
                        yield RecordSpan(path, index, row, offset + pos, csv_columns=columns)
                        index += 1
                    row, quotes, blank = offset + pos, 0, True
            quotes += chunk.count(b'"', pos)
            blank = blank and not _NONBLANK.search(chunk, pos)
            offset += len(chunk)
    if not blank:
        error = "the file ends inside a quoted field (truncated?)" if quotes % 2 else None
        yield RecordSpan(path, index, row, offset, error, csv_columns=columns)


def _csv_record(path: str, index: int, text: bytes, columns: tuple[int, ...]) -> RawRecord:
    """One CSV row -> the seed-format record `{"prompt", "response", "logits": logits_data}` as
    JSON text (logits_data is inserted as written, so json judges it as in a JSON input)."""
    try:
        row = next(csv.reader(io.StringIO(text.decode("utf-8"), newline="")), [])
    except UnicodeDecodeError as e:
        return RawRecord(path, index, None, f"row {index}: byte {e.start}: {e.reason}", "non_utf8")
    except csv.Error as e:
        return RawRecord(path, index, None, f"row {index}: {e}", "invalid_csv")
    if len(row) <= max(columns):
        return RawRecord(path, index, None, f"row {index} has {len(row)} fields, the header "
                         f"needs {max(columns) + 1}", "invalid_csv")
    prompt, response, logits = (row[c] for c in columns)
    return RawRecord(path, index, b"".join((
        b'{"prompt": ', json.dumps(prompt).encode(), b', "response": ',
        json.dumps(response).encode(), b', "logits": ', logits.encode(), b"}")))


class _ArrayFramer:
    """Frames the elements of one top-level JSON array from a file read in chunks."""

    def __init__(self, path: str, f, head: bytes, pos: int, chunk_bytes: int):
        self.path, self.f, self.chunk_bytes = path, f, chunk_bytes
        self.buf, self.pos = head, pos
        self.base = 0  # file offset of buf[0]
        self.eof = False

    def _more(self) -> bool:
        """Drops consumed bytes before `keep`, appends a chunk; False at end of file."""
        if self.eof:
            return False
        chunk = self.f.read(max(self.chunk_bytes, len(self.buf) - self.keep))
        self.base += self.keep
        self.buf, self.pos = self.buf[self.keep:] + chunk, self.pos - self.keep
        self.keep = 0
        self.eof = not chunk
        return bool(chunk)

    def _skip_ws(self) -> bool:
        """Moves past whitespace; False if the file ended."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return True
            self.keep = self.pos
            if not self._more():
                return False

    def _error(self, index: int, what: str) -> RecordSpan:
        at = self.base + self.pos
        return RecordSpan(self.path, index, at, at, f"invalid JSON at byte {at}: {what}")

    def records(self) -> Iterator[RecordSpan]:
        index = 0
        self.keep = self.pos
        while True:
            if not self._skip_ws():
                yield self._error(index, "file ends inside the top-level array (truncated?)")
                return
            if self.buf[self.pos] == ord(']') and index == 0:
                break
            self.keep = self.pos  # a scalar's first byte stays in the buffer from here on
            start = self.base + self.pos
            self.arrays: list[tuple[int, int]] = []
            end, problem = self._frame_element()
            if problem:
                yield self._error(index, problem + "; the rest of the file is not read")
                return
            yield RecordSpan(self.path, index, start, self.base + end, arrays=tuple(self.arrays))
            index += 1
            self.pos = end
            self.keep = end
            if not self._skip_ws():
                yield self._error(index, "file ends inside the top-level array (truncated?)")
                return
            sep = self.buf[self.pos]
            if sep == ord(']'):
                break
            if sep != ord(','):
                yield self._error(index, f"expected ',' or ']' after record {index - 1}, "
                                         f"found {chr(sep)!r}")
                return
            self.pos += 1
        self.pos += 1
        self.keep = self.pos
        if self._skip_ws():
            yield self._error(index, "trailing data after the top-level array")

    def _frame_element(self) -> tuple[int, str | None]:
        """(end offset in buf, None) of the element at self.pos, or (-1, what went wrong)."""
        if self.buf[self.pos] not in b'{[':
            return self._frame_scalar()
        # Open the element by hand: the regex would otherwise swallow a small element whole.
        stack = [self.buf[self.pos]]
        pos = self.pos + 1
        key = -1  # offset of the next `"full_logits": [` at or after pos (len(buf): none)
        while True:
            if key < pos:
                key = _find_key(self.buf, pos)
            pos = _SKIP.match(self.buf, pos, key).end()
            if pos == key < len(self.buf):
                # The regex stopped at the key text, so it is outside any string: a real key.
                bracket, end = _flat_array_end(self.buf, key)
                if end is None:  # not a flat number array: the regex frames it
                    key = _find_key(self.buf, key + 1)
                    continue
                if end > 0:
                    self.arrays.append((self.base + bracket, self.base + end))
                    pos = end
                    continue
            elif pos < len(self.buf) and self.buf[pos] != ord('"'):
                c = self.buf[pos]
                if c in _CLOSERS:
                    if not stack or stack.pop() != _CLOSERS[c]:
                        self.pos = pos
                        return -1, f"unbalanced {chr(c)!r}"
                else:
                    stack.append(c)
                pos += 1
                if not stack:
                    return pos, None
                continue
            elif string := _STRING.match(self.buf, pos):
                pos = string.end()  # a whole string that runs past the key text (inside it)
                continue
            # A chunk boundary (or an unterminated string): read on and resume here. The open
            # brackets are on the stack, so the bytes before pos are not needed again.
            self.pos = self.keep = pos
            if not self._more():
                return -1, "file ends inside a record (truncated?)"
            pos, key = self.pos, -1

    def _frame_scalar(self) -> tuple[int, str | None]:
        while True:
            end = _SCALAR.match(self.buf, self.pos).end()
            at = self.buf[end] if end < len(self.buf) else None
            if at is not None and at in b',]':
                return end, None
            if at is not None and at != ord('"'):
                self.pos = end
                return -1, f"unexpected {chr(at)!r}"
            if not self._more():  # the chunk ended, maybe inside a string
                return -1, "file ends inside a record (truncated?)"


def _find_key(buf: bytes, pos: int) -> int:
    """Offset of the next `"full_logits": [` text at or after pos; len(buf) if none."""
    m = FULL_LOGITS_KEY.search(buf, pos)
    return m.start() if m else len(buf)


def _flat_array_end(buf: bytes, key: int) -> tuple[int, int | None]:
    """For the `"full_logits": [` at `key`: (offset of its `[`, the offset after its `]` if the
    array holds no brackets, braces or strings (found with memchr, not the regex); -1 if its `]`
    is not in buf yet; None if it is not such a flat array)."""
    start = FULL_LOGITS_KEY.match(buf, key).end()
    close = buf.find(b"]", start)
    limit = close if close >= 0 else len(buf)
    if any(buf.find(c, start, limit) >= 0 for c in (b'"', b"[", b"{", b"}")):
        return start - 1, None
    return start - 1, close + 1 if close >= 0 else -1
