"""Training for acceptance (issue 16): alpha / lk gradients against float64 NumPy finite
differences, weighted and vocabulary-restricted loss through both head cuts against a float64
dense reference, position weights, and the draft_blocks layout against a per-segment loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax.train import loss, masking
from tests.helpers import (MASK, SEGMENTS, jax_divergence, np_buckets, np_divergence,
                           packed_batch, topk_case)


def np_loss(student, ids, lp, kind, temperature, lk_weight=None):
    p, q = np_buckets(student, ids, lp, temperature)
    return np_divergence(p, q, kind, lk_decay=1.5, lk_weight=lk_weight)


@pytest.mark.parametrize("kind", ["alpha", "lk"])
@pytest.mark.parametrize("temperature", [1.0, 1.4])
def test_alpha_and_lk_gradients_match_float64_finite_differences(kind, temperature):
    student, ids, lp = topk_case(np.random.default_rng(11))
    student = student.astype(np.float64)
    p, q = np_buckets(student, ids, lp, temperature)
    w = np.exp(-1.5 * np.minimum(p, q).sum(-1))  # lk's KL weight, held fixed (no gradient)
    got = jax.grad(lambda x: jax_divergence(x, ids, lp, kind, temperature, 0.5, 1.5).sum())(
        jnp.asarray(student, jnp.float32))
    want, h = np.zeros_like(student), 1e-6
    for idx in np.ndindex(student.shape):
        up, down = student.copy(), student.copy()
        up[idx] += h
        down[idx] -= h
        want[idx] = (np_loss(up, ids, lp, kind, temperature, w).sum()
                     - np_loss(down, ids, lp, kind, temperature, w).sum()) / (2 * h)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
    assert np.abs(want).max() > 1e-2  # the reference is not trivially zero


def dense_reference(hidden, head, ids, lp, mask, weights, bias, kind, temperature):
    """float64 sum of weight * divergence, student restricted by the bias."""
    logits = np.einsum("bld,dv->blv", np.asarray(hidden, np.float64),
                       np.asarray(head, np.float64)) + bias
    b, l, v = logits.shape
    d = np_loss(logits.reshape(-1, v), ids.reshape(b * l, -1), lp.reshape(b * l, -1), kind,
                temperature)
    return float(np.sum(np.where(mask.reshape(-1), weights.reshape(-1) * d, 0.0)))


@pytest.mark.parametrize("kind", ["kl", "alpha", "lk"])
@pytest.mark.parametrize("cut", [dict(chunk_axis="sequence", chunk_size=4),
                                 dict(chunk_axis="vocab", vocab_tile=7)])
def test_weighted_restricted_loss_through_the_head(kind, cut):
    rng = np.random.default_rng(12)
    b, seq, d, v, k = 2, 10, 8, 48, 5
    hidden = jnp.asarray(rng.normal(size=(b, seq, d)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), jnp.float32)
    allowed = np.ones(v, bool)
    allowed[rng.permutation(v)[:12]] = False  # the student may not use 12 ids
    inside = np.flatnonzero(allowed)
    ids = np.stack([rng.permutation(inside)[:k] for _ in range(b * seq)]).reshape(b, seq, k)
    lp = np.sort(np.log(rng.dirichlet(np.ones(v), size=(b, seq))[..., :k]), -1)[..., ::-1]
    lp = np.ascontiguousarray(lp).astype(np.float32)
    mask = rng.random((b, seq)) < 0.7
    weights = rng.uniform(0.2, 2.0, size=(b, seq)).astype(np.float32)
    bias = np.where(allowed, 0.0, -np.inf)
    args = (hidden, head, jnp.asarray(ids, jnp.int32), jnp.asarray(lp), jnp.asarray(mask))

    def total(h, w):
        return loss.distill_loss(h, w, *args[2:], kind=kind, temperature=1.3, lk_decay=1.5,
                                 weights_bl=jnp.asarray(weights),
                                 vocab_bias_v=jnp.asarray(bias, jnp.float32), **cut)[0]

    value, grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(hidden, head)
    want = dense_reference(hidden, head, ids, lp, mask, weights, bias, kind, 1.3)
    np.testing.assert_allclose(value, want, rtol=2e-5)
    dense = jax.grad(lambda h, w: loss.dense_distill_loss(
        h, w, *args[2:], kind=kind, temperature=1.3, lk_decay=1.5,
        weights_bl=jnp.asarray(weights), vocab_bias_v=jnp.asarray(bias, jnp.float32))[0],
        argnums=(0, 1))(hidden, head)
    for a, r in zip(grads, dense):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=2e-6 * float(jnp.max(jnp.abs(r))))
    # Restricted: the head columns the student may not use get no gradient.
    assert np.all(np.asarray(grads[1])[:, ~allowed] == 0.0)


def test_acceptance_sums_by_offset_are_the_reference_alpha():
    rng = np.random.default_rng(13)
    hidden = jnp.asarray(rng.normal(size=(1, 6, 4)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(4, 20)), jnp.float32)
    ids = np.stack([rng.permutation(20)[:3] for _ in range(6)])[None].astype(np.int32)
    lp = np.log(rng.dirichlet(np.ones(20), size=(1, 6))[..., :3]).astype(np.float32)
    offsets = np.array([[-1, 0, 1, 2, 0, 1]], np.int32)
    mask = offsets >= 0
    for cut in (dict(chunk_axis="sequence", chunk_size=2), dict(chunk_axis="vocab")):
        _, _, alpha_g = loss.distill_loss(hidden, head, ids, lp, jnp.asarray(mask),
                                          offsets_bl=jnp.asarray(offsets), n_offsets=3, **cut)
        p, q = np_buckets(np.asarray(hidden[0] @ head), ids[0], lp[0], 1.0)
        alpha = np.minimum(p, q).sum(-1)
        want = [alpha[[1, 4]].sum(), alpha[[2, 5]].sum(), alpha[3]]
        np.testing.assert_allclose(alpha_g, want, rtol=1e-5)


def test_streak_and_geometric_weights():
    a = np.array([0.9, 0.6, 0.5, 0.2])
    prefix = np.cumprod(a)
    streak = np.array([prefix[j:].sum() for j in range(4)])
    np.testing.assert_allclose(loss.offset_weights("streak", jnp.asarray(a), 0.0, 4),
                               streak / streak.mean(), rtol=1e-6)
    np.testing.assert_allclose(loss.offset_weights("streak", -jnp.ones(4), 0.0, 4), np.ones(4))
    geo = 0.5 ** np.arange(4)
    np.testing.assert_allclose(loss.offset_weights("geometric", None, 0.5, 4), geo / geo.mean(),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="loss.position_weights"):
        loss.offset_weights("nope", None, 0.5, 4)


@pytest.mark.parametrize("gamma, gamma_max, trailing", [(3, 0, 2), (2, 4, 1)])
def test_draft_blocks_layout_per_segment(gamma, gamma_max, trailing):
    """Per segment: prompt + a prefix visible, a block of gamma scored masks (offsets 0..g-1),
    `trailing` unscored masks, the rest hidden (segment 0); a loop over the segments checks it."""
    batch = packed_batch(np.random.default_rng(14), rows=6, seq=40, segments=SEGMENTS)
    out = jax.jit(lambda k, b: masking.draft_blocks(k, b, mask_token_id=MASK, gamma=gamma,
                                                    gamma_max=gamma_max, trailing=trailing))(
        jax.random.key(3), batch)
    noisy, scored, offset, segs = (np.asarray(x) for x in out)
    gammas, cuts = set(), set()
    for row in range(6):
        for sid in range(1, len(SEGMENTS) + 1):
            where = np.flatnonzero(batch["segment_ids"][row] == sid)
            resp = where[~batch["prompt_mask"][row, where]]
            masked = resp[noisy[row, resp] == MASK]
            assert np.all(noisy[row, where[batch["prompt_mask"][row, where]]]
                          == batch["tokens"][row, where[batch["prompt_mask"][row, where]]])
            c = int(np.searchsorted(resp, masked[0])) if len(masked) else len(resp)
            assert c < len(resp)  # every segment drafts a block
            cuts.add(c)
            np.testing.assert_array_equal(masked, resp[c:c + len(masked)])  # one contiguous run
            visible = resp[c + len(masked):]
            assert np.all(segs[row, visible] == 0)  # the future is hidden
            assert np.all(segs[row, np.setdiff1d(where, visible)] == sid)
            block = masked[:len(masked) - trailing] if len(resp) - c > len(masked) else masked
            g = len(block) if len(resp) - c > len(masked) else None
            if g is not None:
                gammas.add(g)
                assert (gamma <= g <= max(gamma, gamma_max))
            for j, pos in enumerate(masked):
                has_target = batch["target_mask"][row, pos]
                in_block = g is None and j < max(gamma, gamma_max) or g is not None and j < g
                if not in_block:
                    assert not scored[row, pos] and offset[row, pos] == -1
                elif g is not None:
                    assert scored[row, pos] == has_target
                    assert offset[row, pos] == (j if has_target else -1)
    assert len(cuts) > 3
    if gamma_max:
        assert len(gammas) >= 2  # gamma is drawn per segment
