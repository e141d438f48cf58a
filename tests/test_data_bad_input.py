"""Bad input: every kind gets its own skip reason (never a crash, never silent loss)."""

import copy
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from tokenizers import Tokenizer

from data_pipeline.convert import Converter, Options
from data_pipeline.preprocess import preprocess
from data_pipeline.reader import RawRecord, iter_raw_records
from data_pipeline.validate import REASONS
from tests.helpers import make_tokenizers, teacher_record, write_json


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tdir, sdir = make_tokenizers(str(tmp_path_factory.mktemp("tok")))
    t_tok = Tokenizer.from_file(f"{tdir}/tokenizer.json")
    good = teacher_record(t_tok, "Q: ", "Paris is cold.", np.random.default_rng(0))
    return Converter(Options(sdir, tdir, 64, 4)), good


def _set(path):
    def edit(rec):
        *parents, last = path
        obj = rec
        for key in parents:
            obj = obj[key]
        return obj, last
    return edit


def _mutate(rec, kind):
    rec = copy.deepcopy(rec)
    e0 = rec["logits"][0]
    if kind == "missing_field":
        del e0["chosen_token"]
    elif kind == "wrong_type":
        e0["top_5"][1]["logit"] = "high"
    elif kind == "empty_response":
        rec["response"] = ""
    elif kind == "logits_shorter_than_response":
        rec["logits"].pop()
    elif kind == "logits_longer_than_response":
        rec["response"] = rec["response"][:-1]
    elif kind == "teacher_tokens_mismatch_response":
        rec["response"] = "X" + rec["response"][1:]
    elif kind == "non_finite_logits":
        e0["full_logits"][3] = float("nan")
    elif kind == "full_logits_wrong_length":
        e0["full_logits"] = e0["full_logits"][:-1]
    elif kind == "token_id_out_of_range":
        e0["top_5"][2]["token_id"] = 10 ** 6
    elif kind == "chosen_token_mismatch":
        e0["chosen_token_id"] = rec["logits"][1]["chosen_token_id"]
    elif kind == "duplicate_positions":
        rec["logits"][1]["position"] = 0
    elif kind == "unordered_positions":
        rec["logits"][1]["position"], rec["logits"][2]["position"] = 2, 1
    elif kind == "missing_positions":
        for e in rec["logits"]:
            e["position"] += 1
    elif kind == "over_length":
        rec["prompt"] = "word " * 80
    return json.dumps(rec, allow_nan=True).encode()


RECORD_KINDS = ["missing_field", "wrong_type", "empty_response", "logits_shorter_than_response",
                "logits_longer_than_response", "teacher_tokens_mismatch_response",
                "non_finite_logits", "full_logits_wrong_length", "token_id_out_of_range",
                "chosen_token_mismatch", "duplicate_positions", "unordered_positions",
                "missing_positions", "over_length"]


def test_good_record_converts(setup):
    conv, good = setup
    assert conv.convert(RawRecord("f", 0, json.dumps(good).encode())).reason is None


@pytest.mark.parametrize("kind", RECORD_KINDS)
def test_each_bad_record_kind_has_its_reason(setup, kind):
    conv, good = setup
    result = conv.convert(RawRecord("in.json", 7, _mutate(good, kind)))
    assert (result.reason, result.example, result.file, result.index) == (kind, None, "in.json", 7)
    assert result.detail


def test_infinite_logit_and_field_paths_in_details(setup):
    conv, good = setup
    rec = copy.deepcopy(good)
    rec["logits"][1]["top_5"][0]["logit"] = float("inf")
    result = conv.convert(RawRecord("f", 0, json.dumps(rec).encode()))
    assert result.reason == "non_finite_logits" and "logits[1].top_5[0].logit" in result.detail


def test_non_utf8_bytes_and_lone_surrogates(setup):
    conv, good = setup
    text = json.dumps(good).encode().replace(b"Paris", b"Pa\xffis", 1)
    assert conv.convert(RawRecord("f", 0, text)).reason == "non_utf8"
    text = json.dumps(good).replace("Q: ", "Q\\ud800: ", 1).encode()
    assert conv.convert(RawRecord("f", 0, text)).reason == "non_utf8"


def test_full_logits_without_teacher_tokenizer_when_vocabularies_differ(setup, tmp_path):
    conv, good = setup
    no_teacher = Converter(dataclass_replace(conv.opts, teacher_tokenizer=None,
                                             teacher_vocab_size=len(conv.teacher)))
    result = no_teacher.convert(RawRecord("f", 0, json.dumps(good).encode()))
    assert result.reason == "full_logits_need_teacher_tokenizer"
    top5_only = copy.deepcopy(good)
    for e in top5_only["logits"]:
        del e["full_logits"]
    assert no_teacher.convert(RawRecord("f", 0, json.dumps(top5_only).encode())).reason is None


def dataclass_replace(obj, **kw):
    import dataclasses
    return dataclasses.replace(obj, **kw)


def test_overlength_truncate_is_counted_as_repaired(setup, tmp_path):
    conv, good = setup
    rec = copy.deepcopy(good)
    rec["prompt"] = "w " * 20
    path = write_json(str(tmp_path / "in.json"), [rec])
    plen = len(conv.student.encode(rec["prompt"])[0])
    opts = dataclass_replace(conv.opts, max_length=plen + 2, overlength="truncate")
    report = preprocess([path], str(tmp_path / "out"), opts)
    assert (report["written"], report["repaired"]["truncated"]) == (1, 1)
    assert report["response_tokens"] == 2


@pytest.mark.parametrize("tail,reason_count", [
    (b"", 0), (b'{"prompt": "x", "resp', 1), (b"] trailing", None)])
def test_file_level_damage_end_to_end(setup, tmp_path, tail, reason_count):
    """Truncated file / trailing garbage: counted, listed in skipped.jsonl, read = written + skipped."""
    conv, good = setup
    body = json.dumps([good, good | {"prompt": "other"}]).encode()
    text = body[:-1] + b", " + tail if reason_count == 1 else body + tail[1:]
    if tail == b"":
        text = body[:len(body) // 2]
    path = tmp_path / "in.json"
    path.write_bytes(text)
    report = preprocess([str(path)], str(tmp_path / "out"), conv.opts)
    assert report["read"] == report["written"] + sum(report["skipped"].values())
    assert report["skipped"].get("invalid_json") == 1
    listing = [json.loads(line) for line in
               open(tmp_path / "out/teacher_targets/1.0.0/skipped.jsonl")]
    assert [(x["file"], x["reason"]) for x in listing] == [(str(path), "invalid_json")]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_records_never_crash(setup, data):
    """Random edits anywhere in a valid record: a written example or a known skip reason."""
    conv, good = setup
    rec = copy.deepcopy(good)
    for e in rec["logits"][1:]:
        del e["full_logits"]  # one full array is enough, and keeps examples small
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(rec)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent, key = _set(path)(rec)
        value = data.draw(st.one_of(st.none(), st.booleans(), st.integers(-5, 10 ** 6),
                                    st.floats(allow_nan=True), st.text(max_size=5),
                                    st.lists(st.integers(), max_size=2), st.just("__delete__")))
        if value == "__delete__":
            del parent[key]
        else:
            parent[key] = value
    raw = json.dumps(rec, allow_nan=True).encode()
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(raw))))
    result = conv.convert(RawRecord("f", 0, raw if cut is None else raw[:cut]))
    assert (result.example is None) == (result.reason is not None)
    assert result.reason is None or result.reason in REASONS


def _paths(obj, prefix=()):
    """Every (container, key) path of a record, except inside full_logits arrays."""
    out = []
    if not isinstance(obj, (dict, list)):
        return out
    items = list(obj.items()) if isinstance(obj, dict) else list(enumerate(obj))
    for k, v in items:
        out.append(prefix + (k,))
        if isinstance(v, (dict, list)) and k != "full_logits":
            out.extend(_paths(v, prefix + (k,)))
    return out


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=200), st.integers(1, 16))
def test_fuzzed_bytes_frame_without_crashing(tmp_path_factory, blob, chunk):
    path = tmp_path_factory.mktemp("fz") / "x.json"
    path.write_bytes(b"[" + blob)
    records = list(iter_raw_records(str(path), chunk_bytes=chunk))
    assert all((r.text is None) == (r.error is not None) for r in records)
    assert [r.index for r in records] == list(range(len(records)))
