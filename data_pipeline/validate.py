"""Parse and check one seed-format record; every problem is a `SkipRecord(reason, detail)`.

`full_logits` arrays are reduced to a `Target` one at a time, so a record with hundreds of
128k-float arrays never holds them all: the memory of one record is its JSON text plus one array.
Their numbers are parsed by fast_logits (simdjson, ~60x faster than json) and the rest of the
record (a few hundred bytes per teacher token: the top-5), or a whole record without such arrays,
by msgspec (2.5x faster than json here, and equal to it on what it accepts). The result is
exactly what json alone gives (`parse_record(fast=False)`, the reference), because anything
the fast paths are not sure of is left to json.

Skip reasons (the report counts them by these names):
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable

import msgspec
import numpy as np

from data_pipeline import fast_logits
from data_pipeline.targets import Target

REASONS = {
    "invalid_json": "not valid JSON (truncated file, trailing garbage, unbalanced brackets)",
    "invalid_csv": "a CSV row that does not parse (unbalanced quotes, too few fields)",
    "non_utf8": "bytes that are not UTF-8, or lone surrogate escapes in a string",
    "wrong_type": "a field has the wrong JSON type",
    "missing_field": "a required field is absent",
    "empty_response": "the response is empty",
    "duplicate_positions": "two `logits` entries have the same `position`",
    "unordered_positions": "`position` values are not increasing",
    "missing_positions": "`position` values are not 0..n-1 (a gap or a bad start)",
    "non_finite_logits": "a logit is NaN or infinite",
    "full_logits_wrong_length": "`full_logits` length differs from the teacher vocabulary size",
    "token_id_out_of_range": "a token id is outside the teacher vocabulary",
    "chosen_token_mismatch": "`chosen_token` and `chosen_token_id` disagree",
    "logits_shorter_than_response": "the teacher tokens spell only a prefix of the response",
    "logits_longer_than_response": "the teacher tokens spell more than the response",
    "teacher_tokens_mismatch_response": "the teacher tokens do not spell the response",
    "full_logits_need_teacher_tokenizer":
        "full_logits with a teacher vocabulary that differs from the student's; "
        "pass --teacher-tokenizer",
    "over_length": "longer than --max-length (with --overlength skip, or the prompt alone)",
    "no_teacher_targets": "no student position got a teacher target",
}
__doc__ += "\n".join(f"- {k}: {v}" for k, v in REASONS.items())

# What a user can do about each reason (said when a run writes nothing).
FIXES = {
    "invalid_json": "check that the file was written completely (not truncated) as a JSON "
                    "array or JSONL",
    "invalid_csv": "write the CSV with Python's csv module (columns prompt, response, "
                   "logits_data), completely",
    "non_utf8": "write the dump as UTF-8",
    "wrong_type": "write the fields with the seed format's types (see the details)",
    "missing_field": "every record needs prompt, response and logits entries with "
                     "position, chosen_token, chosen_token_id and top_5 (or full_logits)",
    "empty_response": "drop records with empty responses from the dump",
    "duplicate_positions": "each logits entry needs its own position 0..n-1",
    "unordered_positions": "write the logits entries in position order",
    "missing_positions": "write one logits entry per response token, positions 0..n-1",
    "non_finite_logits": "the teacher produced NaN/inf logits; regenerate those records",
    "full_logits_wrong_length": "full_logits must hold one value per teacher vocabulary entry: "
                                "pass the --teacher-tokenizer (or --teacher-vocab-size) of the "
                                "model that wrote them, or regenerate the dump with full logits "
                                "(a dump with truncated full_logits cannot be used; remove the "
                                "field to train on the top-5 only)",
    "token_id_out_of_range": "pass the teacher's --teacher-tokenizer or --teacher-vocab-size",
    "chosen_token_mismatch": "pass the tokenizer that wrote the dump as --teacher-tokenizer",
    "logits_shorter_than_response": "the dump has fewer teacher tokens than its response; "
                                    "regenerate it with one logits entry per response token",
    "logits_longer_than_response": "the dump has more teacher tokens than its response; "
                                   "regenerate it with one logits entry per response token",
    "teacher_tokens_mismatch_response": "the teacher tokens must spell the response; pass the "
                                        "tokenizer that wrote the dump as --teacher-tokenizer",
    "full_logits_need_teacher_tokenizer": "pass --teacher-tokenizer",
    "over_length": "raise --max-length, or pass --overlength truncate",
    "no_teacher_targets": "the two tokenizers never start a token at the same place; check "
                          "--student-tokenizer and --teacher-tokenizer",
}
assert FIXES.keys() == REASONS.keys()


class SkipRecord(Exception):
    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclasses.dataclass
class Entry:
    chosen_token: str
    chosen_id: int
    top5_tokens: list[str]
    top5_ids: np.ndarray       # int64 [n <= 5]
    top5_logits: np.ndarray    # float64 [n]
    full: Target | None        # reduced full_logits, None when the entry had none


@dataclasses.dataclass
class TeacherRecord:
    prompt: str
    response: str
    entries: list[Entry]


@dataclasses.dataclass(frozen=True)
class _BadFullLogits:
    reason: str
    detail: str


FullLogitsReducer = Callable[[np.ndarray], Target]


def parse_record(text, reduce_full: FullLogitsReducer, vocab_size: int | None,
                 full_length: int, length_hint: str = "", fast: bool = True,
                 start: int = 0, arrays: tuple[tuple[int, int], ...] | None = None
                 ) -> TeacherRecord:
    """Raw JSON bytes (the record is text[start:]; text: bytes or a mapping) -> checked record.
    arrays: where the framer found flat `full_logits` arrays (RawRecord.arrays), if it looked.

    vocab_size: the teacher vocabulary size when known (bounds token ids); full_length: the
    length every `full_logits` must have (`length_hint` says why, in the error). fast=False
    parses the record with json alone (the reference the fast paths must equal)."""
    def check_array(logits: np.ndarray, finite: bool = False) -> Target | _BadFullLogits:
        return _check_logits(logits, reduce_full, full_length, length_hint, finite)

    def check(value) -> Target | _BadFullLogits:
        logits = _as_logits(value)
        return logits if isinstance(logits, _BadFullLogits) else check_array(logits)

    obj = _NOT_FAST
    if fast:
        spans = fast_logits.find_arrays(text, start) if arrays is None else arrays
        obj = (_loads_fast(text, spans, arrays is not None, check_array, check, start) if spans
               # Without full_logits arrays (small: the top-5 alone), all of it to msgspec.
               else _resolve_full(_decode_kept(memoryview(text)[start:]), check))
    if obj is _NOT_FAST:  # json streams: one full_logits list at a time
        obj = _loads(text[start:], check)
    return _check_record(obj, vocab_size, full_length)


def _loads(text: bytes, check: Callable) -> object:
    """json.loads, every `full_logits` value replaced by check(value): the reference."""
    def hook(obj: dict):
        if "full_logits" in obj:
            obj["full_logits"] = check(obj["full_logits"])
        return obj

    try:
        return json.loads(text, object_hook=hook)
    except UnicodeDecodeError as e:
        raise SkipRecord("non_utf8", f"byte {e.start}: {e.reason}") from None
    except (ValueError, RecursionError) as e:  # ValueError: also Python's int digit limit
        raise SkipRecord("invalid_json", str(e)) from None


_NOT_FAST = object()
_DECODE = msgspec.json.Decoder()


def _decode_kept(text) -> object:
    """msgspec's parse of `text`, or _NOT_FAST where it refuses it (then json decides).

    On what it accepts msgspec equals json.loads (checked here on 300k numbers of every
    spelling, and by tests/test_data_fastparse.py): integers of any size, correctly rounded
    floats, the last of duplicate keys. It refuses NaN / Infinity literals, numbers beyond
    float64 (json: inf), escaped lone surrogates (json keeps them), a UTF-8 BOM and other
    encodings, invalid UTF-8, and Python's 4300-digit integers."""
    try:
        return _DECODE.decode(text)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return _NOT_FAST


# What stands for a `full_logits` array fast_logits parsed, in the text msgspec / json then
# parse: a string no JSON text can hold unless it writes `\u0000`, which the fast path checks.
_PLACEHOLDER, _PLACEHOLDER_TEXT, _NUL_ESCAPE = "\0", b'"\\u0000"', b"\\u0000"


def _loads_fast(text, spans, flat: bool, check_array: Callable, check: Callable,
                start: int = 0) -> object:
    """What `_loads(text[start:], check)` returns, with the number arrays of `full_logits`
    parsed by fast_logits (simdjson) one at a time, and the rest of the record (a placeholder in
    place of each array) by msgspec, or json where msgspec refuses it.

    spans: fast_logits.find_arrays(text, start), or the framer's spans (flat: they hold no
    brackets, so parse_array need not check again).

    _NOT_FAST whenever the result could differ from `_loads`: no array was parsed, json fails on
    the rest (so `_loads` reports the error), the text writes `\\u0000` itself, or an array was
    not the value of the `full_logits` key of a `logits` entry (e.g. the key text was inside a
    string, a key was repeated, or the key sat elsewhere)."""
    if json.detect_encoding(text[start:start + 4]) != "utf-8":
        return _NOT_FAST
    pieces, parsed, pos = [], [], start
    for begin, end in spans:
        logits = fast_logits.parse_array(text, begin, end, flat)
        if logits is not None:  # else the rest's parser reads this array
            pieces.append(text[pos:begin])
            parsed.append(check_array(logits, finite=True))  # now: one float array at a time
            pos = end
    pieces.append(text[pos:])
    if not parsed or any(_NUL_ESCAPE in p for p in pieces):
        return _NOT_FAST
    rest = _PLACEHOLDER_TEXT.join(pieces)
    obj = _decode_kept(rest)
    if obj is _NOT_FAST:  # NaN / Infinity literals, lone surrogates, ...: json's reading
        try:
            obj = json.loads(rest)
        except (ValueError, RecursionError):  # also UnicodeDecodeError
            return _NOT_FAST
    return _resolve_full(obj, check, parsed)


def _resolve_full(obj, check: Callable, parsed: list | None = None) -> object:
    """obj with the `full_logits` of each `logits` entry replaced by check(value), or by the
    next of `parsed` where it is the placeholder: the only `full_logits` _check_record reads.
    _NOT_FAST unless every one of `parsed` found its entry (or obj is _NOT_FAST)."""
    if obj is _NOT_FAST:
        return obj
    queue = iter(parsed or ())
    used = 0
    entries = obj.get("logits") if isinstance(obj, dict) else None
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, dict) and "full_logits" in entry:
            value = entry["full_logits"]
            if parsed and value == _PLACEHOLDER:
                entry["full_logits"], used = next(queue, None), used + 1
            else:
                entry["full_logits"] = check(value)
    return obj if used == len(parsed or ()) else _NOT_FAST


def _as_logits(values) -> np.ndarray | _BadFullLogits:
    if not isinstance(values, list):
        return _BadFullLogits("wrong_type", f"is {type(values).__name__}, not a list")
    if not set(map(type, values)) <= {int, float}:  # numpy would take "1.5" and true as numbers
        i, bad = next((i, v) for i, v in enumerate(values) if type(v) not in (int, float))
        return _BadFullLogits("wrong_type",
                              f"holds {type(bad).__name__} at index {i}, not a number")
    try:
        return np.asarray(values, np.float64)
    except OverflowError:
        return _BadFullLogits("non_finite_logits", "holds an integer too large for float64")


def _check_logits(logits: np.ndarray, reduce_full: FullLogitsReducer, length: int,
                  hint: str, finite_known: bool = False) -> Target | _BadFullLogits:
    """logits float64 [n] -> the reduced Target, or why the array is unusable (finite_known:
    fast_logits already checked that every value is finite)."""
    if logits.size != length:
        return _BadFullLogits("full_logits_wrong_length",
                              f"has {logits.size} values, expected {length} {hint}")
    finite = None if finite_known else np.isfinite(logits)
    if finite is not None and not finite.all():
        return _BadFullLogits("non_finite_logits",
                              f"is {logits[~finite][0]} at index {np.flatnonzero(~finite)[0]}")
    return reduce_full(logits)


def _get(obj: dict, key: str, kind, where: str):
    if key not in obj:
        raise SkipRecord("missing_field", f"{where}{key} is missing")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise SkipRecord("wrong_type", f"{where}{key} is {type(value).__name__}, expected {names}")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise SkipRecord("non_utf8", f"{where}{key} holds a lone surrogate") from None
    return value


def _finite(value: float, where: str) -> float:
    try:
        value = float(value)
    except OverflowError:
        raise SkipRecord("non_finite_logits", f"{where} is an integer too large for float64"
                         ) from None
    if not math.isfinite(value):
        raise SkipRecord("non_finite_logits", f"{where} is {value}")
    return value


def _check_id(token_id: int, vocab_size: int | None, where: str) -> int:
    if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
        raise SkipRecord("token_id_out_of_range",
                         f"{where} = {token_id} is outside the teacher vocabulary "
                         f"[0, {vocab_size if vocab_size is not None else '?'})")
    return token_id


def _check_record(obj, vocab_size: int | None, full_length: int) -> TeacherRecord:
    if not isinstance(obj, dict):
        raise SkipRecord("wrong_type", f"the record is {type(obj).__name__}, expected an object")
    prompt = _get(obj, "prompt", str, "")
    response = _get(obj, "response", str, "")
    logits = _get(obj, "logits", list, "")
    if not response:
        raise SkipRecord("empty_response", "response is \"\"")
    entries, positions = [], []
    for i, raw in enumerate(logits):
        where = f"logits[{i}]."
        if not isinstance(raw, dict):
            raise SkipRecord("wrong_type", f"logits[{i}] is {type(raw).__name__}, expected object")
        positions.append(_get(raw, "position", int, where))
        has_full = isinstance(raw.get("full_logits"), Target)
        # Ids index full_logits, so those bound them when the vocabulary size is unknown.
        bound = full_length if vocab_size is None and has_full else vocab_size
        entries.append(_check_entry(raw, bound, where))
    _check_positions(positions)
    return TeacherRecord(prompt, response, entries)


def _check_entry(raw: dict, vocab_size: int | None, where: str) -> Entry:
    chosen = _get(raw, "chosen_token", str, where)
    chosen_id = _check_id(_get(raw, "chosen_token_id", int, where), vocab_size,
                          where + "chosen_token_id")
    tokens, ids, logits = [], [], []
    for j, cand in enumerate(_get(raw, "top_5", list, where)):
        w = f"{where}top_5[{j}]."
        if not isinstance(cand, dict):
            raise SkipRecord("wrong_type", f"{w[:-1]} is {type(cand).__name__}, expected object")
        tokens.append(_get(cand, "token", str, w))
        ids.append(_check_id(_get(cand, "token_id", int, w), vocab_size, w + "token_id"))
        logits.append(_finite(_get(cand, "logit", (int, float), w), w + "logit"))
    full = raw.get("full_logits")
    if isinstance(full, _BadFullLogits):
        raise SkipRecord(full.reason, f"{where}full_logits {full.detail}")
    if full is not None and not isinstance(full, Target):
        raise SkipRecord("wrong_type", f"{where}full_logits is {type(full).__name__}")
    if full is None and not tokens:
        raise SkipRecord("missing_field", f"{where}top_5 is empty and full_logits is missing")
    return Entry(chosen, chosen_id, tokens, np.asarray(ids, np.int64),
                 np.asarray(logits, np.float64), full)


def _check_positions(positions: list[int]) -> None:
    if len(set(positions)) != len(positions):
        dup = next(p for p in positions if positions.count(p) > 1)
        raise SkipRecord("duplicate_positions", f"position {dup} appears more than once")
    for i in range(1, len(positions)):
        if positions[i] < positions[i - 1]:
            raise SkipRecord("unordered_positions",
                             f"logits[{i}].position {positions[i]} < logits[{i - 1}].position "
                             f"{positions[i - 1]}")
    if positions != list(range(len(positions))):
        first = next(i for i, p in enumerate(positions) if p != i)
        raise SkipRecord("missing_positions", f"logits[{first}].position is {positions[first]}, "
                                              f"expected {first}")
