"""Parse and check one seed-format record; every problem is a `SkipRecord(reason, detail)`.

`full_logits` arrays are reduced to a `Target` while the JSON is being parsed (through the
decoder's object hook), so a record with hundreds of 128k-float arrays never holds them all as
Python floats: the memory of one record is its JSON text plus one array.

Skip reasons (the report counts them by these names):
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable

import numpy as np

from data_pipeline.targets import Target

REASONS = {
    "invalid_json": "not valid JSON (truncated file, trailing garbage, unbalanced brackets)",
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
                 full_length: int, length_hint: str = "") -> TeacherRecord:
    """Raw JSON bytes -> checked record.

    vocab_size: the teacher vocabulary size when known (bounds token ids); full_length: the
    length every `full_logits` must have (`length_hint` says why, in the error)."""
    def hook(obj: dict):
        if "full_logits" in obj:
            obj["full_logits"] = _reduce(obj["full_logits"], reduce_full, full_length,
                                         length_hint)
        return obj

    try:
        obj = json.loads(text, object_hook=hook)
    except UnicodeDecodeError as e:
        raise SkipRecord("non_utf8", f"byte {e.start}: {e.reason}") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise SkipRecord("invalid_json", str(e)) from None
    return _check_record(obj, vocab_size, full_length)


def _reduce(values, reduce_full: FullLogitsReducer, length: int, hint: str):
    if not isinstance(values, list):
        return _BadFullLogits("wrong_type", f"is {type(values).__name__}, not a list")
    try:
        logits = np.asarray(values, np.float64)
    except (TypeError, ValueError):
        return _BadFullLogits("wrong_type", "holds something that is not a number")
    if logits.ndim != 1:
        return _BadFullLogits("wrong_type", "is not a flat list of numbers")
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
    if not math.isfinite(value):
        raise SkipRecord("non_finite_logits", f"{where} is {value}")
    return float(value)


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
