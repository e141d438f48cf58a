"""Targets: top-k log-probs in student vocabulary vs dense float64 NumPy references, unit and
end to end through `preprocess` with two different real tokenizers."""

import hashlib
import json
import warnings

import numpy as np
import pytest
from tokenizers import Tokenizer

from data_pipeline import records, targets
from data_pipeline.convert import Options
from data_pipeline.preprocess import preprocess
from tests.helpers import make_tokenizers, teacher_record, write_json

# These tests check the targets' computation to float32 precision, so they store float32
# (record format 1); format 2's quantisation is checked against it in test_data_codec.py.
EXACT = 1


def _dense_logprobs(logits):
    x = np.asarray(logits, np.float64)
    return x - np.log(np.sum(np.exp(x - x.max()))) - x.max()


def test_full_logits_identity_matches_dense_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, 1000)
    t = targets.from_full_logits(logits, None, 1000, 16)
    ref = _dense_logprobs(logits)
    order = np.argsort(-ref)[:16]
    np.testing.assert_array_equal(t.ids, order)
    np.testing.assert_allclose(t.logprobs, ref[order], rtol=1e-6)
    assert t.tail_known and t.mass_kept == 1.0


def test_full_logits_mapping_merges_mass_and_sends_unmapped_to_tail():
    logits = np.log(np.array([0.4, 0.1, 0.2, 0.25, 0.05]))
    id_map = np.array([2, 2, -1, 0, 1])  # teacher 0 and 1 both spell student token 2
    t = targets.from_full_logits(logits, id_map, 3, 2)
    np.testing.assert_array_equal(t.ids, [2, 0])
    np.testing.assert_allclose(np.exp(t.logprobs), [0.5, 0.25], rtol=1e-6)
    assert t.mass_kept == pytest.approx(0.8)  # teacher 2 has no student token
    assert 1 - np.exp(t.logprobs).sum() == pytest.approx(0.25, abs=1e-6)  # tail: 0.2 + 0.05


def test_top5_renormalises_over_mapped_candidates():
    logits = np.array([3.0, 2.0, 1.0, 0.5, 0.0])
    t = targets.from_top5(np.array([7, -1, 4, 7, 9]), logits, 8)
    p = np.exp(logits) / np.exp(logits).sum()
    kept = p[[0, 2, 3, 4]].sum()
    np.testing.assert_array_equal(t.ids, [7, 4, 9])
    np.testing.assert_allclose(np.exp(t.logprobs), np.array([p[0] + p[3], p[2], p[4]]) / kept,
                               rtol=1e-6)
    assert not t.tail_known and t.mass_kept == pytest.approx(kept)
    assert targets.from_top5(np.array([-1, -1]), np.array([1.0, 0.0]), 4) is None


def test_top5_drops_candidates_whose_probability_underflows():
    """Logits 1000 apart: exp underflows to 0 for the second candidate, which is left out
    (no -inf log-prob stored at a real id, no divide-by-zero warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = targets.from_top5(np.array([3, 5]), np.array([0.0, -1000.0]), 4)
    np.testing.assert_array_equal(t.ids, [3])
    np.testing.assert_array_equal(t.logprobs, [0.0])


def _gpt2_byte_decoder():
    """Reference byte-level table, written independently of data_pipeline.alignment."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _reference_example(rec, t_tok, s_tok, top_k):
    """Dense reference: teacher/student char offsets from the tokenizers' own encodings (ASCII
    text, so chars are bytes), vocab by decoded strings, q = sum of teacher probs per student id."""
    dec = _gpt2_byte_decoder()
    special = {"<|pad|>", "<|eot|>", "<|mask|>"}

    def t_bytes(tok):
        return tok.encode() if tok in special else bytes(dec[c] for c in tok)

    def s_bytes(tok):
        if tok.startswith("<0x") and len(tok) == 6:
            return bytes([int(tok[3:5], 16)])
        return tok.encode() if tok in special else tok.replace("▁", " ").encode()

    s_vocab = {s_bytes(tok): i for tok, i in sorted(s_tok.get_vocab().items(), key=lambda x: -x[1])}
    v_s = max(s_tok.get_vocab().values()) + 1
    t_enc = t_tok.encode(rec["response"], add_special_tokens=False)
    s_enc = s_tok.encode(rec["response"], add_special_tokens=False)
    t_at = {o[0]: i for i, o in enumerate(t_enc.offsets)}
    plen = len(s_tok.encode(rec["prompt"], add_special_tokens=False).ids)
    out = {}
    for j, (start, _) in enumerate(s_enc.offsets):
        if start not in t_at or (j == 0 and s_enc.tokens[0] == "▁"):  # a bare dummy prefix
            continue
        p = np.exp(_dense_logprobs(rec["logits"][t_at[start]]["full_logits"]))
        q = np.zeros(v_s)
        for t_id, pt in enumerate(p):
            token = t_tok.id_to_token(t_id)  # None: padding beyond the teacher tokenizer
            s_id = None if token is None else s_vocab.get(t_bytes(token))
            if s_id is not None:
                q[s_id] += pt
        top = np.argsort(-q, kind="stable")[:top_k]
        out[plen + j] = (top, np.log(q[top]))
    return out


def _example_id(rec: dict) -> str:
    digest = hashlib.sha256(rec["prompt"].encode() + b"\0" + rec["response"].encode()).digest()
    return digest[:8].hex()


def _pad(rec: dict, pad: int, value: float) -> dict:
    """rec with `pad` more full_logits per entry: ids of a padded teacher vocabulary."""
    for e in rec["logits"]:
        e["full_logits"] = e["full_logits"] + [value] * pad
    return rec


@pytest.mark.parametrize("workers,pad", [(1, 0), (2, 0), (1, 7)])
def test_stored_targets_match_dense_reference_across_tokenizers(tmp_path, workers, pad):
    """pad > 0: --teacher-vocab-size beyond the teacher tokenizer; the padding ids (with much of
    the mass here) have no student token, so their mass goes to the tail."""
    tdir, sdir = make_tokenizers(str(tmp_path))
    t_tok, s_tok = (Tokenizer.from_file(f"{d}/tokenizer.json") for d in (tdir, sdir))
    rng = np.random.default_rng(1)
    texts = ["Paris is the capital of France.", "The lazy dog sleeps; the fox jumps!",
             "def add(a, b): return a + b", "Speculative decoding drafts tokens."]
    recs = [_pad(teacher_record(t_tok, f"Question {i}: ", t, rng), pad, 9.0)
            for i, t in enumerate(texts)]
    path = write_json(str(tmp_path / "in.json"), recs)
    top_k = 6
    vocab = t_tok.get_vocab_size(with_added_tokens=True) + pad
    report = preprocess([path], str(tmp_path / "out"),
                        Options(sdir, tdir, 64, top_k, vocab if pad else None,
                                validation_fraction=0.0, record_format=EXACT), workers=workers)
    assert (report["read"], report["written"]) == (4, 4)
    by_id = {_example_id(r): r for r in recs}
    src = records.open_split(str(tmp_path / "out"), "train")
    for i in range(len(src)):
        ex = src[i]
        rec = by_id[ex["example_id"].decode()]
        ref = _reference_example(rec, t_tok, s_tok, top_k)
        positions = np.flatnonzero(records.target_mask(ex))
        assert sorted(ref) == positions.tolist()
        for row, pos in enumerate(positions):
            ref_ids, ref_lp = ref[pos]
            n = np.isfinite(ex["teacher_logprobs"][row]).sum()
            np.testing.assert_allclose(ex["teacher_logprobs"][row][:n], ref_lp[:n], rtol=1e-5)
            # Ids must agree except among exact ties of probability.
            assert set(ex["teacher_ids"][row][:n]) == set(ref_ids[:n]) or \
                np.allclose(np.sort(ref_lp[:n]), np.sort(ex["teacher_logprobs"][row][:n]))
        assert ex["tail_known"]
        np.testing.assert_array_equal(
            ex["tokens"], s_tok.encode(rec["prompt"], add_special_tokens=False).ids
            + s_tok.encode(rec["response"], add_special_tokens=False).ids)
    cov = report["coverage"]
    assert 0 < cov["positions_kept_pct"] < 100 and 0 < cov["teacher_mass_kept_pct"] <= 100
    assert (cov["teacher_mass_kept_pct"] < 50) == (pad > 0)  # 7 padding ids at +9: most mass
    assert report["alignment_mode"] == "mapped"


def test_identical_tokenizers_give_exact_identity(tmp_path):
    tdir, _ = make_tokenizers(str(tmp_path))
    t_tok = Tokenizer.from_file(f"{tdir}/tokenizer.json")
    rng = np.random.default_rng(2)
    rec = teacher_record(t_tok, "Q: ", "Snow ☃ falls on the café.", rng)
    path = write_json(str(tmp_path / "in.jsonl"), [rec], jsonl=True)
    for teacher in (tdir, None):  # given, or assumed (and verified on the record)
        out = str(tmp_path / f"out{teacher is None}")
        report = preprocess([path], out, Options(tdir, teacher, 64, 4, validation_fraction=0.0,
                                                          record_format=EXACT))
        assert report["coverage"]["positions_kept_pct"] == 100.0
        ex = records.open_split(out, "train")[0]
        plen = ex["prompt_length"]
        np.testing.assert_array_equal(ex["tokens"][plen:], [e["chosen_token_id"] for e in rec["logits"]])
        for row, e in enumerate(rec["logits"]):
            ref = _dense_logprobs(e["full_logits"])
            order = np.argsort(-ref, kind="stable")[:4]
            np.testing.assert_array_equal(ex["teacher_ids"][row], order)
            np.testing.assert_allclose(ex["teacher_logprobs"][row], ref[order], rtol=1e-6)
        assert json.load(open(f"{out}/teacher_targets/1.0.0/report.json"))["read"] == 1


def test_identity_with_padded_teacher_vocab(tmp_path):
    """Identical tokenizers, full_logits longer than the vocabulary: the padding ids are no
    student ids (their mass is tail), nor are top-5 candidates among them."""
    tdir, _ = make_tokenizers(str(tmp_path))
    t_tok = Tokenizer.from_file(f"{tdir}/tokenizer.json")
    vocab, pad = t_tok.get_vocab_size(with_added_tokens=True), 5
    rng = np.random.default_rng(3)
    full = _pad(teacher_record(t_tok, "Q: ", "Paris is cold.", rng), pad, 30.0)
    top5 = teacher_record(t_tok, "R: ", "Paris is cold.", rng, full=False)
    for e in top5["logits"]:
        e["top_5"][0].update(token="<|reserved|>", token_id=vocab + 2, logit=50.0)
    path = write_json(str(tmp_path / "in.json"), [full, top5])
    out = str(tmp_path / "out")
    report = preprocess([path], out, Options(tdir, tdir, 64, 4, vocab + pad,
                                             validation_fraction=0.0, record_format=EXACT))
    assert report["written"] == 2 and report["alignment_mode"] == "identity"
    src = records.open_split(out, "train")
    examples = {src[i]["example_id"].decode(): src[i] for i in range(2)}
    ex_full, ex_top5 = examples[_example_id(full)], examples[_example_id(top5)]
    for row, e in enumerate(full["logits"]):
        ref = _dense_logprobs(e["full_logits"])[:vocab]  # normalised over the padding too
        order = np.argsort(-ref, kind="stable")[:4]
        np.testing.assert_array_equal(ex_full["teacher_ids"][row], order)
        np.testing.assert_allclose(ex_full["teacher_logprobs"][row], ref[order], rtol=1e-6)
    for row, e in enumerate(top5["logits"]):
        logits = np.array([c["logit"] for c in e["top_5"][1:]])
        p = np.exp(logits - logits.max())
        p /= p.sum()  # renormalised over the four candidates that are student tokens
        order = np.argsort(-p, kind="stable")
        ids = np.array([c["token_id"] for c in e["top_5"][1:]])[order]
        np.testing.assert_array_equal(ex_top5["teacher_ids"][row], ids)
        np.testing.assert_allclose(np.exp(ex_top5["teacher_logprobs"][row]), p[order], rtol=1e-5)
