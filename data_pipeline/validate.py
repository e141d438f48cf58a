"""Parse and check one seed-format record; every problem is a `SkipRecord(reason, detail)`.

`full_logits` arrays are reduced to a `Target` one at a time, so a record with hundreds of
128k-float arrays never holds them all: the memory of one record is its JSON text plus one array.
Their numbers are parsed by fast_logits (simdjson, ~60x faster than json) and the rest of the
record by json (a few hundred bytes per teacher token: the top-5); the result is exactly what json alone gives (`parse_record(fast=False)`,
the reference), because anything the fast path is not sure of is left to json.

Skip reasons (the report counts them by these names):
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable

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


def parse_record(text: bytes, reduce_full: FullLogitsReducer, vocab_size: int | None,
                 full_length: int, length_hint: str = "", fast: bool = True) -> TeacherRecord:
    """Raw JSON bytes -> checked record.

    vocab_size: the teacher vocabulary size when known (bounds token ids); full_length: the
    length every `full_logits` must have (`length_hint` says why, in the error). fast=False
    parses every `full_logits` with json alone (the reference the fast path must equal)."""
    def check_array(logits: np.ndarray) -> Target | _BadFullLogits:
        return _check_logits(logits, reduce_full, full_length, length_hint)

    def check(value) -> Target | _BadFullLogits:
        logits = _as_logits(value)
        return logits if isinstance(logits, _BadFullLogits) else check_array(logits)

    obj = _loads_fast(text, check, check_array) if fast else _NOT_FAST
    if obj is _NOT_FAST:
        obj = _loads(text, check)
    return _check_record(obj, vocab_size, full_length)


class _Parsed:
    """A `full_logits` array the fast path parsed and checked; json sees a bare NaN in its place."""
    __slots__ = ("value", "used")

    def __init__(self, value: Target | _BadFullLogits):
        self.value, self.used = value, False


def _loads(text: bytes, check: Callable, parse_constant: Callable | None = None) -> object:
    """json.loads, every `full_logits` value replaced by check(value) (or its _Parsed value)."""
    def hook(obj: dict):
        if "full_logits" in obj:
            value = obj["full_logits"]
            if isinstance(value, _Parsed):
                value.used = True
                obj["full_logits"] = value.value
            else:
                obj["full_logits"] = check(value)
        return obj

    try:
        return json.loads(text, object_hook=hook, parse_constant=parse_constant)
    except UnicodeDecodeError as e:
        raise SkipRecord("non_utf8", f"byte {e.start}: {e.reason}") from None
    except (ValueError, RecursionError) as e:  # ValueError: also Python's int digit limit
        raise SkipRecord("invalid_json", str(e)) from None


_NOT_FAST = object()


def _loads_fast(text: bytes, check: Callable, check_array: Callable) -> object:
    """What `_loads(text, check)` returns, with the number arrays of `full_logits` parsed by
    fast_logits; json sees a bare NaN in place of each (and calls parse_constant for each bare
    NaN, in order).

    _NOT_FAST whenever the result could differ from `_loads`: json fails on the edited text (so
    `_loads` reports the error), the record has NaN literals of its own, or an array was not the
    value of a `full_logits` key after all (e.g. the key text was inside a string)."""
    spans = fast_logits.find_arrays(text)
    if not spans or json.detect_encoding(text) != "utf-8":
        return _NOT_FAST
    pieces, parsed, pos = [], [], 0
    for start, end in spans:
        logits = fast_logits.parse_array(text, start, end)
        if logits is not None:  # else json parses this array
            pieces.append(text[pos:start])
            parsed.append(_Parsed(check_array(logits)))  # now: one float array at a time
            pos = end
    pieces.append(text[pos:])
    if not parsed or any(b"NaN" in p for p in pieces):
        return _NOT_FAST
    queue = iter(parsed)
    try:
        obj = _loads(b"NaN".join(pieces), check,
                     lambda name: next(queue) if name == "NaN" else float(name))
    except SkipRecord:
        return _NOT_FAST
    return obj if all(p.used for p in parsed) else _NOT_FAST


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
                  hint: str) -> Target | _BadFullLogits:
    """logits float64 [n] -> the reduced Target, or why the array is unusable."""
    if logits.size != length:
        return _BadFullLogits("full_logits_wrong_length",
                              f"has {logits.size} values, expected {length} {hint}")
    finite = np.isfinite(logits)
    if not finite.all():
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
