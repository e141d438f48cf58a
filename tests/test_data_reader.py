"""Reader: record framing of JSON arrays / JSONL at every chunk size, and framing errors."""

import json

import pytest

from data_pipeline.reader import expand_inputs, iter_raw_records

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
