"""Loader: batch contract, packing invariants, sharding, shuffling, exact resume (also via orbax)."""

import numpy as np
import pytest

from data_pipeline import records
from data_pipeline.convert import Options
from data_pipeline.loader import make_loader, read_metadata
from data_pipeline.preprocess import preprocess
from tests.helpers import TEXTS, toy_teacher_records, write_json

SEQ, K = 48, 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    tdir, sdir, recs = toy_teacher_records(
        str(root), [(f"Q{i}: ", TEXTS[i % 5][: 10 + 3 * i]) for i in range(24)],
        full=lambda i: i % 2 == 0)
    out = str(root / "out")
    preprocess([write_json(str(root / "in.json"), recs)], out,
               Options(sdir, tdir, SEQ, K, validation_fraction=0.0))
    return out


def _loader(data_dir, **kw):
    args = dict(batch_size=4, seq_len=SEQ, seed=3, shard_index=0, shard_count=1)
    return make_loader(data_dir, "train", **(args | kw))


def _stored_by_tokens(data_dir):
    src = records.open_split(data_dir, "train")
    return {tuple(src[i]["tokens"]): src[i] for i in range(len(src))}


def test_metadata(data_dir):
    meta = read_metadata(data_dir)
    assert (meta.top_k, meta.max_length, meta.num_examples["train"]) == (K, SEQ, 24)
    assert meta.alignment_mode == "mapped"


def test_batches_follow_the_contract_and_unpack_to_the_stored_examples(data_dir):
    stored = _stored_by_tokens(data_dir)
    seen = []
    for batch in _loader(data_dir, num_epochs=1, shuffle=False):
        assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
            "tokens": ((4, SEQ), "int32"), "positions": ((4, SEQ), "int32"),
            "segment_ids": ((4, SEQ), "int32"), "prompt_mask": ((4, SEQ), "bool"),
            "target_mask": ((4, SEQ), "bool"), "teacher_ids": ((4, SEQ, K), "int32"),
            "teacher_logprobs": ((4, SEQ, K), "float32")}
        for r in range(4):
            seg = batch["segment_ids"][r]
            pad = seg == 0
            assert not (batch["target_mask"][r][pad].any() or batch["prompt_mask"][r][pad].any())
            assert np.all(np.isneginf(batch["teacher_logprobs"][r][~batch["target_mask"][r]]))
            for s in range(1, seg.max() + 1):
                at = seg == s
                np.testing.assert_array_equal(batch["positions"][r][at], np.arange(at.sum()))
                ex = stored[tuple(batch["tokens"][r][at])]
                mask = records.target_mask(ex)
                np.testing.assert_array_equal(batch["target_mask"][r][at], mask)
                assert batch["prompt_mask"][r][at].sum() == ex["prompt_length"]
                k = ex["teacher_ids"].shape[1]
                np.testing.assert_array_equal(batch["teacher_ids"][r][at][mask][:, :k],
                                              ex["teacher_ids"])
                np.testing.assert_array_equal(batch["teacher_logprobs"][r][at][mask][:, :k],
                                              ex["teacher_logprobs"])
                seen.append(ex["example_id"])
    assert sorted(seen) == sorted(e["example_id"] for e in stored.values())  # each exactly once


def test_unpacked_rows_hold_one_example(data_dir):
    batch = next(_loader(data_dir, pack=False))
    assert batch["segment_ids"].max() == 1
    assert np.all(batch["positions"][batch["segment_ids"] == 1] >= 0)


def test_shards_are_disjoint_and_cover_the_split(data_dir):
    ids = []
    for shard in range(2):
        it = _loader(data_dir, shard_index=shard, shard_count=2, num_epochs=1, pack=False)
        ids.append({tuple(r[s == 1]) for b in it for r, s in zip(b["tokens"], b["segment_ids"])
                    if s.any()})
        assert next(_loader(data_dir, shard_index=shard, shard_count=2))["tokens"].shape[0] == 2
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 24


def test_shuffle_is_deterministic_and_differs_per_epoch_and_seed(data_dir):
    def order(seed, n=48):
        it = _loader(data_dir, seed=seed, pack=False, batch_size=1)
        return [tuple(next(it)["tokens"][0]) for _ in range(n)]
    a = order(3)
    epoch1, epoch2 = a[:24], a[24:]
    assert a == order(3) and epoch1 != order(4)[:24]
    assert sorted(epoch1) == sorted(epoch2) and len(set(epoch1)) == 24 and epoch1 != epoch2


def test_resume_from_state_continues_exactly(data_dir):
    it = _loader(data_dir)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    resumed = _loader(data_dir)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_state_round_trips_through_orbax(data_dir, tmp_path):
    import grain
    import orbax.checkpoint as ocp
    it = _loader(data_dir)
    next(it)
    with ocp.CheckpointManager(str(tmp_path / "ckpt"),
                               item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as mgr:
        mgr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
        want = next(it)
        resumed = _loader(data_dir)
        mgr.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    got = next(resumed)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_smaller_top_k_keeps_the_largest_and_renormalises_top5(data_dir):
    batch = next(_loader(data_dir, top_k=2, pack=False, shuffle=False))
    full = next(_loader(data_dir, pack=False, shuffle=False))
    m = batch["target_mask"]
    np.testing.assert_array_equal(batch["teacher_ids"][m], full["teacher_ids"][m][:, :2])
    p = np.exp(batch["teacher_logprobs"][m]).sum(-1)
    assert np.all(p <= 1 + 1e-5) and np.any(np.isclose(p, 1.0, atol=1e-5))
