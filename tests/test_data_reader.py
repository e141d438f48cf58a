"""Reader: record framing of JSON arrays / JSONL at every chunk size, and framing errors."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from data_pipeline.reader import expand_inputs, iter_raw_records, iter_record_spans

RECORDS = [
    {"prompt": "a [tricky] {prompt} \"quoted\" \\", "response": "x]}", "logits": [
        {"position": 0, "top_5": [{"token": "[", "logit": 1.5}], "full_logits": [1.0, -2e3, 3]}]},
    {"prompt": "ünïcødé ☃", "response": "", "logits": [[[[[["deep"]]]]]]},
    {"prompt": "", "response": "y", "logits": []},
]


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


def _parse(path, chunk):
    return list(iter_raw_records(path, chunk_bytes=chunk))


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
@pytest.mark.parametrize("indent", [None, 2])
def test_array_framing_matches_json_at_any_chunk_size(tmp_path, chunk, indent):
    path = _write(tmp_path, "a.json", json.dumps(RECORDS, indent=indent, ensure_ascii=False))
    got = _parse(path, chunk)
    assert [r.error for r in got] == [None] * 3
    assert [json.loads(r.text) for r in got] == RECORDS
    assert [r.index for r in got] == [0, 1, 2]


def test_jsonl_one_record_per_nonblank_line(tmp_path):
    text = "\n".join(json.dumps(r) for r in RECORDS) + "\n\n"
    got = _parse(_write(tmp_path, "a.jsonl", text), 5)
    assert [json.loads(r.text) for r in got] == RECORDS


def test_scalar_and_empty_elements_are_framed_not_dropped(tmp_path):
    got = _parse(_write(tmp_path, "a.json", '[1, "s,]", null, {}]'), 2)
    assert [r.text for r in got] == [b"1", b'"s,]"', b"null", b"{}"]
    assert _parse(_write(tmp_path, "b.json", " [ ] "), 1) == []


@pytest.mark.parametrize("text,n_good,message", [
    ('[{"a": 1}, {"b": [1, 2', 1, "file ends inside a record"),
    ('[{"a": 1}, {"b": "unterminated', 1, "file ends inside a record"),
    ('[{"a": 1},', 1, "file ends inside the top-level array"),
    ('[{"a": 1}] garbage', 1, "trailing data after the top-level array"),
    ('[{"a": 1}, {"b": [1}]', 1, "unbalanced '}'"),
    ('[{"a": 1} {"b": 2}]', 1, "expected ',' or ']'"),
])
def test_framing_errors_are_reported_as_records(tmp_path, text, n_good, message):
    got = _parse(_write(tmp_path, "bad.json", text), 4)
    assert len(got) == n_good + 1
    assert all(r.error is None for r in got[:n_good])
    bad = got[-1]
    assert bad.text is None and bad.index == n_good and message in bad.error


def test_expand_inputs_globs_and_missing(tmp_path):
    a = _write(tmp_path, "a.json", "[]")
    b = _write(tmp_path, "b.jsonl", "")
    assert expand_inputs([str(tmp_path / "*.json*"), a]) == [a, b]
    with pytest.raises(ValueError, match="nope"):
        expand_inputs([str(tmp_path / "nope*.json")])


# `full_logits` arrays are skipped with memchr when flat; everything else by the regex.
TRICKY = [
    {"logits": [{"full_logits": [1.0, -2e3, 3]}, {"full_logits": [4, 5], "x": "]"}]},
    {"prompt": 'x "full_logits": [1, ] y', "full_logits": [1, "]", 2]},
    {"full_logits": [[1], [2, [3]]], "b": {"full_logits": []}},
    {"full_logits": [1, {"a": "]"}], 'k"full_logits': [7], "full_logits ": [8]},
    {"full_logits": "not a list [", "x": ["full_logits", [1]], "y": {"full_logits": {}}},
]


@pytest.mark.parametrize("chunk", [1, 2, 5, 13, 64, 1 << 20])
@pytest.mark.parametrize("indent", [None, 2])
def test_full_logits_anywhere_frames_like_json(tmp_path, chunk, indent):
    text = json.dumps(TRICKY, indent=indent).replace('"full_logits": [4', '"full_logits" :\n[4')
    got = _parse(_write(tmp_path, "a.json", text), chunk)
    assert [json.loads(r.text) for r in got] == TRICKY


def test_spans_locate_records_in_the_file(tmp_path):
    text = " [" + json.dumps(RECORDS)[1:]
    path = _write(tmp_path, "a.json", text)
    spans = list(iter_record_spans(path, chunk_bytes=8))
    assert [json.loads(text[s.start:s.end]) for s in spans] == RECORDS
    lines = "\n" + "\n\n".join(json.dumps(r) for r in RECORDS)
    spans = list(iter_record_spans(_write(tmp_path, "a.jsonl", lines)))
    assert [json.loads(lines[s.start:s.end]) for s in spans] == RECORDS


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet='ab"\\[]{} ,:', max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["full_logits", "a", 'full_logits"', "[", "}"]), inner, max_size=3)
    | st.fixed_dictionaries({"full_logits": st.lists(st.floats(-9, 9), max_size=5)}),
    max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(st.lists(JSON_VALUES, max_size=4), st.integers(1, 40), st.booleans())
def test_generated_json_frames_like_json(tmp_path_factory, values, chunk, indent):
    path = tmp_path_factory.mktemp("gen") / "a.json"
    path.write_text(json.dumps(values, indent=2 if indent else None))
    assert [json.loads(r.text) for r in _parse(str(path), chunk)] == values


@pytest.mark.parametrize("ext", ["json", "jsonl"])
def test_mapped_records_equal_read_ones(tmp_path, ext):
    """RecordSpan.map() (an mmap from the page boundary before the record) holds the bytes that
    read() returns, at text[start:], for records at any offset (here past several pages)."""
    records = [{"i": i, "pad": "x" * (3000 * i)} for i in range(6)]
    path = tmp_path / f"in.{ext}"
    path.write_text(json.dumps(records) if ext == "json" else
                    "\n".join(json.dumps(r) for r in records) + "\n")
    spans = list(iter_record_spans(str(path)))
    mapped = [span.map() for span in spans]
    assert any(m.start > 0 for m in mapped) and any(s.start > 4096 for s in spans)
    assert [m.text[m.start:] for m in mapped] == [s.read().text for s in spans]
    assert [json.loads(m.text[m.start:]) for m in mapped] == records
