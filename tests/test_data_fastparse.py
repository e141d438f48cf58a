"""The fast `full_logits` path (fast_logits + validate._loads_fast) equals json.loads exactly: the
same float64 numbers bit for bit, the same Targets, the same skip reason and detail for every bad
input; and it is really taken on ordinary records."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from data_pipeline import fast_logits, targets
from data_pipeline.reader import iter_record_spans
from data_pipeline.validate import _NOT_FAST, SkipRecord, _loads_fast, parse_record

V = 6  # full_logits length in these records


def _json_numbers(body: bytes):
    """Reference: float64 [n] from json.loads + np.asarray, or None unless `[body]` is a non-empty
    JSON list of numbers that are all finite in float64."""
    try:
        values = json.loads(b"[" + body + b"]")
        if not values or any(type(v) not in (int, float) for v in values):
            return None
        array = np.asarray(values, np.float64)
    except (ValueError, OverflowError, RecursionError):
        return None
    return array if np.isfinite(array).all() else None


def _same_bits(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _beyond_64_bits(body: bytes) -> bool:
    """Whether an integer literal of `[body]` is outside simdjson's 64-bit integers (then the fast
    path leaves the array to json)."""
    ints = [int(t) for t in body.replace(b",", b" ").split() if not any(c in t for c in b".eE")]
    return any(not -2**63 <= i < 2**64 for i in ints)


def _check_numbers(body: bytes):
    fast, ref = fast_logits.parse_numbers(body), _json_numbers(body)
    if ref is None or (fast is None and _beyond_64_bits(body)):
        assert fast is None, (body, fast)
    else:
        assert fast is not None and _same_bits(fast, ref), (body, fast, ref)


NUMBER_FORMATS = [repr, json.dumps, "{:.4f}".format, "{:.17e}".format, "{:E}".format,
                  "{:.0f}".format, lambda x: f"{x:e}".replace("e", "E+", 1).replace("+-", "-")]


@st.composite
def number_texts(draw) -> str:
    """One JSON number in any spelling json accepts, or a near miss it rejects."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        x = draw(st.floats(allow_nan=False, allow_infinity=False))
        return draw(st.sampled_from(NUMBER_FORMATS))(x)
    if kind == 1:
        return str(draw(st.one_of(st.integers(-10**20, 10**20), st.integers(-2**1100, 2**1100))))
    if kind == 2:
        mantissa = draw(st.from_regex(r"-?(0|[1-9][0-9]{0,40})(\.[0-9]{1,40})?", fullmatch=True))
        return mantissa + draw(st.from_regex(r"([eE][+-]?[0-9]{1,4})?", fullmatch=True))
    return draw(st.sampled_from(["+1", ".5", "1.", "01", "-01", "00", "0x10", "1e", "1e+", "-",
                                 "--1", "1-2", "1.2.3", "1e5e5", "1.e5", "-.5", "NaN", "Infinity",
                                 "-Infinity", "nan", "inf", "true", "null", '"1"', "[1]", "1 2",
                                 "", "-0", "-0.0", "0e0", "-0E-0", "1e400", "-1e400", "1e-400",
                                 "4.9e-324", "2.4703282292062328e-324", "9" * 400,
                                 "1" + "0" * 4400, "1." + "0" * 800 + "1", "\u0661"]))


SEPARATORS = st.sampled_from([",", ", ", " ,", "\n,\n", ",\t", "\r\n, ", ",,", ""])


@settings(max_examples=400, deadline=None)
@given(st.lists(number_texts(), min_size=1, max_size=8), st.data())
def test_numbers_equal_json_bit_for_bit(tokens, data):
    """Whatever the spelling: the same float64 values as json, or None where json has none."""
    body = tokens[0]
    for token in tokens[1:]:
        body += data.draw(SEPARATORS) + token
    body = data.draw(st.sampled_from(["", " ", "\n "])) + body + data.draw(
        st.sampled_from(["", " ", "\n"]))
    _check_numbers(body.encode())


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789-+.eE, \n\t\rNa[]\"x", max_size=30))
def test_random_character_soup_equals_json(body):
    _check_numbers(body.encode())


@pytest.mark.parametrize("body, expected", [
    (b"1, -2.5e3,0", [1.0, -2500.0, 0.0]),
    (b" 1E-3 ,\n\t-0.0\r\n", [0.001, -0.0]),
    (b"18446744073709551615,-9223372036854775808", [1.8446744073709552e+19, -2.0**63]),
    (b"4.9e-324,1e-400", [5e-324, 0.0]),
])
def test_numbers_known_values(body, expected):
    assert _same_bits(fast_logits.parse_numbers(body), np.asarray(expected, np.float64))


def test_integers_beyond_64_bits_are_left_to_json():
    assert fast_logits.parse_numbers(b"1, 123456789012345678901234567890") is None
    text = json.dumps({"prompt": "", "response": "a", "logits": [{
        "position": 0, "chosen_token": "a", "chosen_token_id": 1, "top_5": [],
        "full_logits": [1, 123456789012345678901234567890, 0, 0, 0, 0]}]}).encode()
    rec = parse_record(text, _capture, 10, V, "(hint)")
    assert rec.entries[0].full.logprobs[1] == 1.2345678901234568e+29


def test_integer_minus_zero_is_plus_zero_like_json():
    """json reads `-0` as the int 0 (so +0.0), but `-0.0` as the float -0.0."""
    got = fast_logits.parse_numbers(b"-0,-0.0,-0e0,0")
    assert [math.copysign(1, x) for x in got] == [1, -1, -1, 1]


# ---- Whole records: fast path vs json alone --------------------------------------------------

ID_MAP = np.array([0, 2, -1, 1, 2, 3])


def _capture(logits):
    """A reducer that keeps the exact float64 input, so any difference in it shows."""
    return targets.Target(np.arange(2, dtype=np.int32), logits.copy(), True, float(logits[0]))


REDUCERS = [_capture, lambda x: targets.from_full_logits(x, ID_MAP, 4, 3),
            lambda x: targets.from_full_logits(x, None, V, 3)]


def _outcome(text: bytes, fast: bool, reduce=_capture):
    try:
        rec = parse_record(text, reduce, 10, V, "(hint)", fast=fast)
    except SkipRecord as skip:
        return "skip", skip.reason, skip.detail
    entries = [(e.chosen_token, e.chosen_id, e.top5_tokens, e.top5_ids.tobytes(),
                e.top5_logits.tobytes(), None if e.full is None else
                (e.full.ids.tobytes(), e.full.logprobs.tobytes(), e.full.tail_known,
                 np.float64(e.full.mass_kept).tobytes())) for e in rec.entries]
    return "ok", rec.prompt, rec.response, entries


def _entry(pos: int, full: str, extra: str = "") -> str:
    return (f'{{"position": {pos}, "chosen_token": "r", "chosen_token_id": 1, "top_5": '
            f'[{{"token": "r", "token_id": 1, "logit": 2.5}}], "full_logits": {full}{extra}}}')


def _record(*entries: str, prompt: str = '"Q"', extra: str = "") -> bytes:
    return (f'{{"prompt": {prompt}, "response": "r", "logits": [{", ".join(entries)}]'
            f'{extra}}}').encode()


GOOD = "[1.5, -2, 0.25, 3e1, -0.5, 7]"
GOOD2 = "[0.5,1,2,3,4,5]"


def _assert_same(text: bytes, fast_expected: bool | None = None):
    """Fast and json-only parses agree for every reducer; optionally: the fast path was taken."""
    for reduce in REDUCERS:
        assert _outcome(text, True, reduce) == _outcome(text, False, reduce), text[:300]
    if fast_expected is not None:
        check = lambda v, finite=False: v  # noqa: E731 (the values are not looked at)
        spans = fast_logits.find_arrays(text)
        assert bool(spans and _loads_fast(text, spans, False, check, check) is not _NOT_FAST
                    ) == fast_expected


ADVERSARIAL = [
    (_record(_entry(0, GOOD), _entry(1, GOOD2)), True),
    (_record(_entry(0, "[\n  1.5,\n  -2,\n  0.25,\n  30,\n  -0.5,\n  7\n]")), True),
    (json.dumps(json.loads(_record(_entry(0, GOOD))), indent=2).encode(), True),
    (_record(_entry(0, GOOD)).replace(b'"full_logits": ', b'"full_logits" :\n '), True),
    (_record(_entry(0, "[-0, -1000, -1000, -1000, -1000, -1000]")), True),  # int -0 -> +0.0
    (_record(_entry(0, "[-0.0, -1000, -1000, -1000, -1000, -1000]")), True),
    (_record(_entry(0, GOOD), prompt='"say \\"full_logits\\": [1, 2, 3, 4, 5, 6]"'), True),
    # A full_logits array outside the logits entries (never read): json alone.
    (_record(_entry(0, GOOD), prompt='{"full_logits": [1, 2, 3, 4, 5, 6]}'), False),
    (_record(_entry(0, GOOD), extra=', "full_logits": [1, 2, 3, 4, 5, 6]'), False),
    (_record(_entry(0, GOOD), prompt='"NaN"'), True),
    (_record(_entry(0, GOOD), prompt='"\\u0000"'), False),  # the placeholder's text: json alone
    (_record(_entry(0, GOOD), prompt='"a\\\\u0000"'), False),  # (or what looks like it)
    (_record(_entry(0, "[1, 2, 3, NaN, 5, 6]")), False),
    (_record(_entry(0, "[1, 2, 3, Infinity, 5, 6]"), _entry(1, GOOD)), True),
    (_record(_entry(0, GOOD).replace("2.5", "NaN")), True),  # msgspec refuses: json reads the rest
    (_record(_entry(0, GOOD).replace('"token_id": 1', '"token_id": ' + "9" * 30)), True),
    (_record(_entry(0, GOOD).replace('"position": 0', '"position": 18446744073709551616')), True),
    (_record(_entry(0, GOOD).replace("2.5", "-Infinity")), True),
    (_record(_entry(0, GOOD, ', "full_logits": ' + GOOD2)), False),  # duplicate key: last wins
    (_record(_entry(0, GOOD, ', "full_logits": "x"')), False),
    (_record(_entry(0, GOOD, ', "full\\u005flogits": ' + GOOD2)), False),  # same key, escaped
    (_record(_entry(0, '"x"', ', "a\\"full_logits": ' + GOOD2)), False),  # key text in a key
    (_record(_entry(0, GOOD)).replace(b'"full_logits"', b'"full\\u005flogits"'), False),
    (_record(_entry(0, "[1, 2, 3, 4, 5]")), True),  # wrong length
    (_record(_entry(0, "[1, 2, 3, 4, 5, 6, 7]")), True),
    (_record(_entry(0, "[]")), False),
    (_record(_entry(0, "[1, 2, 3, 4, 5, " + "9" * 400 + "]")), False),  # too large for float64
    (_record(_entry(0, "[1, 2, 3, 4, 5, " + "9" * 4400 + "]")), False),  # Python's digit limit
    (_record(_entry(0, "[1, 2, 3, 4, 5, 1e400]")), False),
    (_record(_entry(0, "[1, 2, 3, 4, 5, +6]")), False),
    (_record(_entry(0, "[1, 2, 3, 4, 5, .6]")), False),
    (_record(_entry(0, "[1, 2, 3, 4, 5, 06]")), False),
    (_record(_entry(0, "[1, 2, 3, 4, 5, 6.]")), False),
    (_record(_entry(0, "[1, 2, 3, 4, 5, 0x6]")), False),
    (_record(_entry(0, "[1, 2, 3, 4, 5, 6,]")), False),
    (_record(_entry(0, "[1, 2, 3, 4, 5 6]")), False),
    (_record(_entry(0, "[1, 2, 3, 4, 5, true]")), False),
    (_record(_entry(0, '[1, 2, 3, 4, 5, "6"]')), False),
    (_record(_entry(0, "[1, 2, 3, 4, 5, [6]]")), False),
    (_record(_entry(0, "[[1, 2, 3], [4, 5, 6]]")), False),
    (_record(_entry(0, '"1, 2, 3, 4, 5, 6"')), False),
    (_record(_entry(0, "null")), False),
    (_record(_entry(0, GOOD), _entry(1, GOOD2))[:-30], False),  # truncated: json's error
    (_record(_entry(0, GOOD)).replace(b'"Q"', b'"Q\xff"'), False),  # non-UTF-8: json's byte
    (_record(_entry(0, GOOD)).replace(b'"Q"', b'"Q\\ud800"'), True),  # lone surrogate
    (_record(_entry(0, GOOD)).decode().encode("utf-16"), False),
    (b"\xef\xbb\xbf" + _record(_entry(0, GOOD)), False),
    (_record(_entry(0, GOOD)).replace(b'"position": 0', b'"position": 1'), True),
    (_record(_entry(0, GOOD))[:-1] + b"] trailing", False),
]


@pytest.mark.parametrize("text, fast", ADVERSARIAL)
def test_adversarial_records_same_as_json(text, fast):
    _assert_same(text, fast)


def test_fast_path_detail_matches_for_each_bad_full_logits_kind():
    """The reasons themselves, so a change in both paths at once is seen too."""
    reasons = {}
    for name, full in [("nan", "[1, 2, 3, NaN, 5, 6]"), ("inf", "[1, 2, 3, 4, 5, 1e400]"),
                       ("string", '[1, 2, 3, 4, 5, "6"]'), ("nested", "[[1, 2, 3], [4, 5, 6]]"),
                       ("short", "[1, 2, 3, 4, 5]"), ("big", "[1, 2, 3, 4, 5, " + "9" * 400 + "]"),
                       ("plus", "[1, 2, 3, 4, 5, +6]"), ("bool", "[1, 2, 3, 4, 5, true]")]:
        outcome = _outcome(_record(_entry(0, full)), True)
        reasons[name] = outcome[1]
        assert outcome == _outcome(_record(_entry(0, full)), False)
    assert reasons == {"nan": "non_finite_logits", "inf": "non_finite_logits",
                       "string": "wrong_type", "nested": "wrong_type",
                       "short": "full_logits_wrong_length", "big": "non_finite_logits",
                       "plus": "invalid_json", "bool": "wrong_type"}


@st.composite
def full_logits_texts(draw) -> str:
    """A `full_logits` value: mostly V numbers in any spelling, sometimes anything else."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.sampled_from(['"x"', "null", "{}", "[[1]]", "[]", "[1, NaN]", "7"]))
    n = draw(st.sampled_from([V, V, V, V - 1, V + 1]))
    tokens = [draw(number_texts()) if draw(st.integers(0, 9)) == 0 else
              draw(st.sampled_from(NUMBER_FORMATS))(draw(st.floats(-50, 50)))
              for _ in range(n)]
    return "[" + draw(st.sampled_from([",", ", ", ",\n  "])).join(tokens) + "]"


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # float32 of -1e300 logprobs
@settings(max_examples=150, deadline=None)
@given(st.lists(full_logits_texts(), min_size=1, max_size=4), st.data())
def test_generated_records_same_as_json(fulls, data):
    text = _record(*[_entry(i, f) for i, f in enumerate(fulls)])
    if data.draw(st.booleans()):
        text = text[:data.draw(st.integers(0, len(text)))]
    _assert_same(text)


def _mapped_outcome(raw, reduce):
    """_outcome's summary (the logprobs of each entry) of a RawRecord parsed where it lies."""
    try:
        rec = parse_record(raw.text, reduce, 10, V, "(hint)", start=raw.start, arrays=raw.arrays)
    except SkipRecord as skip:
        return "skip", skip.reason, skip.detail
    return "ok", [None if e.full is None else e.full.logprobs.tobytes() for e in rec.entries]


def _reference_summary(text: bytes, reduce):
    ref = _outcome(text, False, reduce)
    return ref if ref[0] == "skip" else ("ok", [x[5] and x[5][1] for x in ref[3]])


def test_mapped_record_same_as_bytes(tmp_path):
    """A record mapped from its file (text = an mmap, the record at text[start:]) parses as its
    bytes do, on the fast path and on each fallback (json's error details included)."""
    texts = [_record(_entry(0, GOOD), _entry(1, GOOD2)),  # simdjson + msgspec
             _record(_entry(0, "[1, 2, 3, NaN, 5, 6]")),  # json alone
             _record(_entry(0, GOOD).replace("2.5", "NaN")),  # simdjson + json for the rest
             _record(_entry(0, "null")),  # msgspec alone
             _record(_entry(0, GOOD))[:-3] + b"x]}"]  # invalid: json's error detail
    path = tmp_path / "in.jsonl"
    path.write_bytes(b" " * 4999 + b"\n" + b"\n".join(texts) + b"\n")  # blank first line
    for span, text in zip(iter_record_spans(str(path)), texts):
        raw = span.map()
        text += b"\n"  # a JSONL record is its line
        assert raw.start > 0 and raw.text[raw.start:] == text and raw.arrays is None
        for reduce in REDUCERS:
            assert _mapped_outcome(raw, reduce) == _reference_summary(text, reduce)


def test_framed_arrays_same_as_json(tmp_path):
    """The array spans the framer hands on (RecordSpan.arrays) give json's outcome on every
    adversarial record it frames, and are used: ordinary records carry theirs."""
    path = tmp_path / "in.json"
    path.write_bytes(b"[" + b",\n".join(t for t, _ in ADVERSARIAL if t[:1] == b"{") + b"]")
    framed = 0
    for span in iter_record_spans(str(path)):
        if span.error:  # the truncated record: the rest of the file is not read
            break
        raw, text = span.map(), span.read().text
        framed += 1
        for reduce in REDUCERS:
            assert _mapped_outcome(raw, reduce) == _reference_summary(text, reduce), text[:300]
    assert framed > 30
    first = next(iter_record_spans(str(path)))
    assert len(first.arrays) == 2 and [first.read().text[a - first.start:b - first.start]
                                       for a, b in first.arrays] == [GOOD.encode(), GOOD2.encode()]
