"""Record format 2 (codec.py) against format 1 (float32), and format 1 datasets still loading."""

import os
import shutil

import numpy as np
import pytest

from data_pipeline import codec
from data_pipeline.convert import Options
from data_pipeline.loader import make_loader, read_metadata
from data_pipeline.preprocess import preprocess
from tests.helpers import all_examples, make_tokenizers

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "dataset_v1")


def _random_rows(rng, rows, k, vocab):
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(rows)]).astype(np.int32)
    logits = rng.normal(0, 3, (rows, k))
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True) / 0.9)  # 10% tail
    order = np.argsort(-lp, 1, kind="stable")
    ids, lp = np.take_along_axis(ids, order, 1), np.take_along_axis(lp, order, 1)
    lp[1, 5:], ids[1, 5:] = -np.inf, 0  # a short row (renormalised top-5 style)
    return ids, lp.astype(np.float32)


@pytest.mark.parametrize("vocab", [300, 126464])
def test_codec_round_trip_bounds(vocab):
    ids, lp = _random_rows(np.random.default_rng(vocab), 40, 64, vocab)
    enc = codec.encode(ids, lp)
    got_ids, got_lp = codec.decode({k: np.asarray(v) for k, v in enc.items()})
    used = np.isfinite(lp)
    np.testing.assert_array_equal(np.isfinite(got_lp), used)
    np.testing.assert_array_equal(got_ids[~used], 0)
    for r in range(len(ids)):  # the same ids, each with its own log-prob
        want = dict(zip(ids[r][used[r]], lp[r][used[r]].astype(np.float64)))
        have = dict(zip(got_ids[r][used[r]], got_lp[r][used[r]].astype(np.float64)))
        assert want.keys() == have.keys()
        err = max(abs(have[i] - want[i]) for i in want)
        # Rounding (step / 2) plus the renormalisation onto the stored mass (same order).
        assert err <= float(enc["teacher_step"][r]) * 1.01 + 2e-6
    mass = np.exp(lp.astype(np.float64)).sum(1)  # the tail, 1 - mass, is format 1's
    np.testing.assert_allclose(np.exp(got_lp.astype(np.float64)).sum(1), mass, rtol=2e-6)
    assert np.all(np.diff(np.where(used, got_lp, -1e30), axis=1) <= 0)


def test_format_1_dataset_still_loads_and_matches_format_2(tmp_path):
    v1 = str(tmp_path / "v1")
    shutil.copytree(FIXTURE, v1)
    meta = read_metadata(v1)
    assert meta.record_format == 1 and meta.top_k == 8
    old = all_examples(v1)
    assert len(old) == 6
    batch = next(make_loader(v1, "train", batch_size=2, seq_len=96, shard_index=0,
                             shard_count=1, num_epochs=1))
    assert batch["teacher_ids"].shape == (2, 96, 8) and batch["target_mask"].any()

    tdir, sdir = make_tokenizers(str(tmp_path))  # the same tokenizers the fixture was made with
    seed = os.path.join(FIXTURE, "seed.json")
    new = {}
    for fmt in (1, 2):
        out = str(tmp_path / f"new{fmt}")
        preprocess([seed], out, Options(sdir, tdir, 96, 8, None, "skip", 0.3, record_format=fmt))
        assert read_metadata(out).record_format == fmt
        new[fmt] = all_examples(out)
    assert old.keys() == new[1].keys() == new[2].keys()
    for key, (split, ex) in old.items():
        for fmt in (1, 2):
            assert new[fmt][key][0] == split
        for field in ex:  # today's code writes the fixture's format 1 bit for bit
            np.testing.assert_array_equal(new[1][key][1][field], ex[field])
        got = new[2][key][1]
        for field in ("tokens", "prompt_length", "target_mask_bits", "tail_known"):
            np.testing.assert_array_equal(got[field], ex[field])
        np.testing.assert_allclose(np.exp(got["teacher_logprobs"]).sum(1),
                                   np.exp(ex["teacher_logprobs"]).sum(1), rtol=2e-6)
        lp, want = got["teacher_logprobs"], ex["teacher_logprobs"]
        used = np.isfinite(want)
        np.testing.assert_array_equal(np.isfinite(lp), used)
        span = np.where(used, want, np.inf).min(1) - want[:, 0]  # top-1 minus smallest, <= 0
        # Rows may reorder only among near-equal values: compare sorted, within the grid step.
        assert np.all(np.abs(np.sort(np.where(used, lp, 0) - np.where(used, want, 0), 1)).max(1)
                      <= -span / 254 + 1e-5)
