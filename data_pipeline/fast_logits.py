"""Vectorised parsing of `full_logits` arrays, the bulk of a teacher record's JSON.

json.loads makes a Python float of each of a row's 32k-128k numbers (about 7 ms per 32k-number
row here); instead the whole array text is checked against the JSON number grammar by one RE2
match and converted by pyarrow's string -> float64 cast, both in C (about 1.5 ms). The cast rounds correctly,
like Python's float() and int -> float; the one difference, the integer literal `-0` (JSON: the
int 0, so +0.0; the cast: -0.0), is corrected. Anything else unusual (NaN, nested lists, strings,
non-finite values, numbers JSON forbids) returns None, and the caller leaves that array to json.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.reader import FULL_LOGITS_KEY

_WS = b" \t\n\r"
_NUM = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_W = r"[ \t\n\r]*"
# The text between the brackets: one or more JSON numbers, commas between, JSON whitespace around.
_BODY = f"^{_W}{_NUM}(?:{_W},{_W}{_NUM})*{_W}$"


def find_arrays(text: bytes) -> list[tuple[int, int]]:
    """[start, end) byte spans from the `[` after each `"full_logits":` to the first `]` after it.

    A span is only a candidate: the caller checks that it holds numbers alone and that it really is
    the value of a `full_logits` key (the text may sit inside a string, or be malformed)."""
    spans, pos = [], 0
    while m := FULL_LOGITS_KEY.search(text, pos):
        end = text.find(b"]", m.end())
        if end < 0:
            break
        spans.append((m.end() - 1, end + 1))
        pos = end + 1
    return spans


def parse_numbers(body: bytes) -> np.ndarray | None:
    """float64 [n]: the numbers of an array's text without its brackets (`1.5, -2e3,0`), equal bit
    for bit to np.asarray(json.loads(f"[{body}]"), np.float64).

    None unless `body` is one or more JSON numbers separated by commas and all of them are finite
    in float64 (json.loads then decides: it rejects what JSON forbids, and integers too large for
    float64 fail differently there)."""
    if len(body) >= 2**31 - 1:  # int32 Arrow offsets
        return None
    whole = pa.BinaryArray.from_buffers(
        pa.binary(), 1, [None, pa.py_buffer(np.array([0, len(body)], np.int32)),
                         pa.py_buffer(body)])
    if not pc.match_substring_regex(whole, _BODY)[0].as_py():
        return None
    if any(c in body for c in (b" ", b"\n", b"\t", b"\r")):
        body = body.translate(None, _WS)  # only next to commas and the ends: checked above
    commas = np.flatnonzero(np.frombuffer(body, np.uint8) == ord(","))
    digits = body.translate(None, b",")
    # Number i runs from just after comma i-1 to comma i; each comma before it is now deleted.
    offsets = np.empty(len(commas) + 2, np.int32)
    offsets[0], offsets[-1] = 0, len(digits)
    offsets[1:-1] = commas - np.arange(len(commas))
    numbers = pa.StringArray.from_buffers(len(commas) + 1, pa.py_buffer(offsets),
                                          pa.py_buffer(digits))
    try:
        values = pc.cast(numbers, pa.float64()).to_numpy()
    except pa.ArrowInvalid:
        return None
    if not np.isfinite(values).all():
        return None
    return values if values.all() else _integer_zeros_positive(values, numbers)


def _integer_zeros_positive(values: np.ndarray, numbers: pa.StringArray) -> np.ndarray:
    """values with each -0.0 that was written as the integer `-0` made +0.0, as json has it."""
    values = values.copy()
    for i in np.flatnonzero((values == 0) & np.signbit(values)):
        if not any(c in numbers[i].as_py() for c in ".eE"):
            values[i] = 0.0
    return values
