"""Records: TFDS round trip, splits, workers, atomic/resumable writes, storage cost."""

import json
import os

import numpy as np
import pytest
from tokenizers import Tokenizer

from data_pipeline import preprocess as preprocess_module
from data_pipeline import records
from data_pipeline.convert import Options
from data_pipeline.preprocess import preprocess
from llada_jax import cli
from tests.helpers import TEXTS, all_examples, make_tokenizers, teacher_record, toy_teacher_records, write_json


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    tdir, sdir, recs = toy_teacher_records(
        str(root), [(f"Q{i}: ", TEXTS[i % 5] + f" #{i}") for i in range(30)],
        full=lambda i: i % 3 != 0)
    a = write_json(str(root / "a.json"), recs[:20])
    b = write_json(str(root / "b.jsonl"), recs[20:] + ["not an object"], jsonl=True)
    return root, tdir, sdir, [a, b]


def test_cli_roundtrip_splits_and_report(corpus, tmp_path):
    root, tdir, sdir, inputs = corpus
    out = str(tmp_path / "out")
    rc = cli.main(["preprocess", "--input", str(root / "*.json*"), "--out", out,
                   "--student-tokenizer", sdir, "--teacher-tokenizer", tdir, "--max-length", "96",
                   "--top-k", "8", "--workers", "1", "--validation-fraction", "0.3"])
    assert rc == 0
    report = json.load(open(f"{out}/teacher_targets/1.0.0/report.json"))
    assert (report["read"], report["written"], report["skipped"]) == (31, 30, {"wrong_type": 1})
    info = records.read_info(out)
    assert {s: info.splits[s].num_examples for s in records.SPLITS} == report["written_per_split"]
    assert 0 < report["written_per_split"]["validation"] < 30
    got = all_examples(out)
    assert len(got) == 30
    for split, ex in got.values():
        mask = records.target_mask(ex)
        assert mask[:ex["prompt_length"]].sum() == 0 and mask.sum() == len(ex["teacher_ids"])
        lp = ex["teacher_logprobs"]
        assert np.all(np.diff(np.where(np.isfinite(lp), lp, -1e30), axis=1) <= 0)
        total = np.exp(lp).sum(1)
        assert np.all(total <= 1 + 1e-5)
        if not ex["tail_known"]:
            np.testing.assert_allclose(total, 1.0, rtol=1e-5)


def test_workers_give_identical_datasets(corpus, tmp_path):
    _, tdir, sdir, inputs = corpus
    opts = Options(sdir, tdir, 96, 8, validation_fraction=0.3)
    one = preprocess(inputs, str(tmp_path / "w1"), opts, workers=1)
    two = preprocess(inputs, str(tmp_path / "w2"), opts, workers=2, in_flight_bytes=1)
    assert one["coverage"] == two["coverage"] and one["skipped"] == two["skipped"]
    a, b = all_examples(str(tmp_path / "w1")), all_examples(str(tmp_path / "w2"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][0] == b[k][0]
        for f in a[k][1]:
            np.testing.assert_array_equal(a[k][1][f], b[k][1][f])


def test_crash_leaves_no_complete_dataset_and_rerun_redoes(corpus, tmp_path, monkeypatch):
    _, tdir, sdir, inputs = corpus
    out = str(tmp_path / "out")
    opts = Options(sdir, tdir, 96, 8)
    calls = {"n": 0}
    real = preprocess_module.Report.add

    def crash_midway(self, result):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        real(self, result)

    monkeypatch.setattr(preprocess_module.Report, "add", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        preprocess(inputs, out, opts)
    monkeypatch.undo()
    assert not os.path.exists(f"{out}/teacher_targets/1.0.0")
    os.makedirs(f"{out}/teacher_targets/incomplete.STALE_1.0.0")  # as a SIGKILL would leave
    report = preprocess(inputs, out, opts)
    assert report["written"] == 30
    assert os.listdir(f"{out}/teacher_targets") == ["1.0.0"]
    assert preprocess(inputs, out, opts)["written"] == 30  # reused
    with pytest.raises(ValueError, match="--overwrite"):
        preprocess(inputs, out, Options(sdir, tdir, 96, 4))
    assert preprocess(inputs, out, Options(sdir, tdir, 96, 4), overwrite=True)["metadata"]["top_k"] == 4


def test_bytes_per_response_token_within_budget_at_k64(tmp_path):
    """Realistic lengths (prompt 32, response 256 tokens, k = 64): <= 8k + 16 = 528 bytes."""
    tdir, _ = make_tokenizers(str(tmp_path))
    t_tok = Tokenizer.from_file(f"{tdir}/tokenizer.json")
    rng = np.random.default_rng(0)
    words = " ".join(TEXTS).split()
    recs = []
    for i in range(8):
        ids = rng.integers(5, t_tok.get_vocab_size(), 256)
        response = t_tok.decode(ids.tolist())
        prompt = " ".join(rng.choice(words, 24))
        recs.append(teacher_record(t_tok, prompt, response, rng))
    path = write_json(str(tmp_path / "in.json"), recs)
    report = preprocess([path], str(tmp_path / "out"), Options(tdir, tdir, 1024, 64))
    assert report["written"] == 8
    assert report["bytes_per_response_token"] <= 8 * 64 + 16
