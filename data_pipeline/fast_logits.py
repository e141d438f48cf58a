"""Parsing of `full_logits` arrays, the bulk of a teacher record's JSON, with simdjson.

json.loads makes a Python float of each of a row's 32k-128k numbers (7 MiB/s here for a
128256-number row); pysimdjson parses the array and hands its numbers over as one float64 buffer
(`as_buffer`), with no Python object per number: about 60x faster, the fastest of the kept parsers
measured here (bench/preprocess.py prints the bare rates: orjson and msgspec build Python
lists). simdjson rounds correctly, like Python's float() and int -> float, and is strict RFC 8259,
so on what it accepts it agrees with json bit for bit (the integer `-0` is +0.0 in both). What it
refuses stays in the text for the rest's parser (msgspec, or json: validate.py), with the same
outcome as a record without the fast path: NaN / Infinity literals, integers beyond 64 bits
(and the >4300-digit ones json itself rejects), numbers JSON forbids, strings, booleans, nested
arrays or objects, and out-of-range values like 1e400.
"""

from __future__ import annotations

import numpy as np
import simdjson

from data_pipeline.reader import FULL_LOGITS_KEY

_PARSER = simdjson.Parser()  # reuses its buffers; one per process (workers are processes)


def find_arrays(text: bytes, pos: int = 0) -> list[tuple[int, int]]:
    """[start, end) byte spans from the `[` after each `"full_logits":` (at or after `pos`) to the
    first `]` after it. `text`: bytes or a mapping (mmap).

    A span is only a candidate: the caller checks that it holds numbers alone and that it really is
    the value of a `full_logits` key (the text may sit inside a string, or be malformed)."""
    spans = []
    while m := FULL_LOGITS_KEY.search(text, pos):
        end = text.find(b"]", m.end())
        if end < 0:
            break
        spans.append((m.end() - 1, end + 1))
        pos = end + 1
    return spans


def parse_array(text: bytes, start: int, end: int, flat: bool = False) -> np.ndarray | None:
    """float64 [n]: the numbers of the JSON array text[start:end] (brackets included), equal bit
    for bit to np.asarray(json.loads(text[start:end]), np.float64).

    None unless it is a non-empty flat array of JSON numbers, all finite in float64 and each within
    64-bit integers when written as an integer (json then decides). flat: the caller knows that
    the array holds no inner `[`."""
    if not flat and text.find(b"[", start + 1, end) >= 0:
        return None  # as_buffer would flatten a nested array (one memchr: ~2% of the parse)
    try:
        doc = _PARSER.parse(memoryview(text)[start:end])
        values = np.frombuffer(doc.as_buffer(of_type="d"), np.float64)
    except (ValueError, TypeError, RuntimeError):  # invalid, not numbers, big integers
        return None
    return values if values.size and np.isfinite(values).all() else None


def parse_numbers(body: bytes) -> np.ndarray | None:
    """parse_array of `[body]`: the text between an array's brackets (`1.5, -2e3,0`)."""
    text = b"[" + body + b"]"
    return parse_array(text, 0, len(text))
