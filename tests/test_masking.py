"""Diffusion masking and the drafting condition: exact invariants, statistics, NumPy reference."""

import jax
import numpy as np
import pytest

from llada_jax.distill import masking
from tests.helpers import MASK, SEGMENTS, packed_batch

def masks(batch, mode, seed=0, eps=1e-3):
    noisy, loss_mask = jax.jit(
        lambda k, b: masking.diffusion_mask(k, b, mask_token_id=MASK, mode=mode, eps=eps))(
        jax.random.key(seed), batch)
    noisy = np.asarray(noisy)
    return noisy, np.asarray(loss_mask), noisy != batch["tokens"]


@pytest.mark.parametrize("mode", masking.DIFFUSION_MODES)
def test_prompt_and_padding_never_masked_or_counted(mode):
    batch = packed_batch(np.random.default_rng(0), rows=6, seq=40, segments=SEGMENTS)
    noisy, loss_mask, masked = masks(batch, mode)
    response = (batch["segment_ids"] > 0) & ~batch["prompt_mask"]
    np.testing.assert_array_equal(noisy[~response], batch["tokens"][~response])
    assert not loss_mask[~response].any()
    assert not loss_mask[~batch["target_mask"]].any()
    assert set(np.unique(noisy[masked])) <= {MASK}
    if mode in ("original", "full"):
        np.testing.assert_array_equal(loss_mask, response & batch["target_mask"])
    else:
        np.testing.assert_array_equal(loss_mask, masked & batch["target_mask"])
    if mode == "full":
        np.testing.assert_array_equal(masked, response)


def test_eps_one_masks_everything_and_same_key_same_result():
    batch = packed_batch(np.random.default_rng(1), rows=4, seq=40, segments=SEGMENTS)
    _, _, masked = masks(batch, "original", eps=1.0)
    np.testing.assert_array_equal(masked, (batch["segment_ids"] > 0) & ~batch["prompt_mask"])
    first, second, other = (masks(batch, "masked_only", seed=s)[0] for s in (5, 5, 6))
    np.testing.assert_array_equal(first, second)
    assert (first != other).any()


def segment_fractions(batch, masked):
    """[rows, n_segments] fraction of each segment's response that is masked (all rows share
    one layout)."""
    response = (batch["segment_ids"] > 0) & ~batch["prompt_mask"]
    return np.stack([masked[:, response[0] & (batch["segment_ids"][0] == sid)].mean(1)
                     for sid in range(1, batch["segment_ids"].max() + 1)], axis=1)


def test_masking_rate_follows_a_uniform_t_per_segment():
    """Segments of 1000 response tokens: the masked fraction is p(t) up to binomial noise
    (std <= 0.016), with t ~ U(0, 1) drawn independently for every segment."""
    rows, n_seg = 64, 4
    batch = packed_batch(np.random.default_rng(2), rows=rows, seq=n_seg * 1010,
                         segments=[(10, 1000)] * n_seg)
    eps = 0.2  # a large eps so that the floor p >= eps is visible in the statistics
    _, _, masked = masks(batch, "original", seed=3, eps=eps)
    frac = segment_fractions(batch, masked)
    # Quantiles of the 256 fractions vs those of U(eps, 1): KS distance, 99.9% bound ~0.12 plus
    # the binomial blur.
    expected = eps + (1 - eps) * (np.arange(frac.size) + 0.5) / frac.size
    assert np.max(np.abs(np.sort(frac.ravel()) - expected)) < 0.15
    assert frac.min() > eps - 0.06
    # Independent across segments of one row: correlation of segment 1 vs 2 over 64 rows
    # (std ~0.125 under independence; identical t would give ~1).
    assert abs(np.corrcoef(frac[:, 0], frac[:, 1])[0, 1]) < 0.5
    assert abs(np.corrcoef(frac[:, 2], frac[:, 3])[0, 1]) < 0.5


def test_prefix_block_masks_a_suffix_with_uniform_cut():
    batch = packed_batch(np.random.default_rng(4), rows=200, seq=16, segments=[(2, 4), (3, 4)])
    _, loss_mask, masked = masks(batch, "prefix_block", seed=7)
    response = (batch["segment_ids"] > 0) & ~batch["prompt_mask"]
    for sid in (1, 2):
        resp_masked = masked[:, response[0] & (batch["segment_ids"][0] == sid)]  # [rows, 4]
        # a suffix: once masked, masked to the end of the response
        assert (np.diff(resp_masked.astype(int), axis=1) >= 0).all()
        counts = resp_masked.sum(1)  # = 4 - cut, cut uniform over 0..3
        assert set(counts) == {1, 2, 3, 4}
        assert np.all(np.abs(np.bincount(counts, minlength=5)[1:] / 200 - 0.25) < 0.12)
    np.testing.assert_array_equal(loss_mask, masked & batch["target_mask"])


def test_bad_mode_is_reported():
    batch = packed_batch(np.random.default_rng(5), rows=1, seq=20, segments=SEGMENTS[:1])
    with pytest.raises(ValueError, match="loss.mask_mode"):
        masking.diffusion_mask(jax.random.key(0), batch, mask_token_id=MASK, mode="prefix")


def np_drafting(batch, cuts, gamma):
    """Reference drafting condition written as a loop over segments."""
    noisy = batch["tokens"].copy()
    offset = np.full(noisy.shape, -1, np.int32)
    for row in range(noisy.shape[0]):
        for sid in range(1, batch["segment_ids"][row].max() + 1):
            pos = np.flatnonzero((batch["segment_ids"][row] == sid)
                                 & ~batch["prompt_mask"][row])
            if sid > cuts.shape[1]:
                continue
            for j, p in enumerate(pos):
                if j >= cuts[row, sid - 1]:
                    noisy[row, p] = MASK
                    if j - cuts[row, sid - 1] < gamma and batch["target_mask"][row, p]:
                        offset[row, p] = j - cuts[row, sid - 1]
    return noisy, offset


def test_drafting_batch_matches_reference_with_given_cuts():
    batch = packed_batch(np.random.default_rng(6), rows=3, seq=40, segments=SEGMENTS)
    cuts = np.array([[0, 3, 0], [4, 8, 1], [2, 5, 0]])  # segment 4 not given: left visible
    noisy, offset = masking.drafting_batch(batch, cuts, 4, mask_token_id=MASK)
    want_noisy, want_offset = np_drafting(batch, cuts, 4)
    np.testing.assert_array_equal(noisy, want_noisy)
    np.testing.assert_array_equal(offset, want_offset)


def test_drafting_batch_from_a_seed_is_deterministic_and_consistent():
    batch = packed_batch(np.random.default_rng(7), rows=8, seq=40, segments=SEGMENTS)
    noisy, offset = masking.drafting_batch(batch, 11, 3, mask_token_id=MASK)
    again = masking.drafting_batch(batch, jax.random.key(11), 3, mask_token_id=MASK)
    np.testing.assert_array_equal(noisy, again[0])
    np.testing.assert_array_equal(offset, again[1])
    # Recover each segment's cut from the masked tokens and rebuild with the reference.
    response = (batch["segment_ids"] > 0) & ~batch["prompt_mask"]
    cuts = np.array([[np.argmax(np.asarray(noisy)[row][response[row] & (
        batch["segment_ids"][row] == sid)] == MASK) for sid in range(1, 5)] for row in range(8)])
    want_noisy, want_offset = np_drafting(batch, cuts, 3)
    np.testing.assert_array_equal(noisy, want_noisy)
    np.testing.assert_array_equal(offset, want_offset)


def test_drafting_batch_rejects_bad_cuts():
    batch = packed_batch(np.random.default_rng(8), rows=2, seq=40, segments=SEGMENTS)
    with pytest.raises(ValueError, match="cut points"):
        masking.drafting_batch(batch, np.zeros((3, 2), np.int32), 4, mask_token_id=MASK)
