"""Drafter metrics against NumPy references; per-offset sums through the chunked LM head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax.distill import metrics
from llada_jax.distill import masking
from tests.helpers import (MASK, SEGMENTS, full_vocab_case, jax_divergence, np_buckets,
                           np_divergence, np_softmax, packed_batch, topk_case)


position_metrics = jax.jit(metrics.position_metrics)


def np_position_metrics(logits, ids, lps):
    p, q = np_buckets(logits, ids, lps, 1.0)
    overlap = np.minimum(p, q)
    return {"kl": np_divergence(p, q, "kl"), "alpha_lower": overlap[:, :-1].sum(-1),
            "alpha_upper": overlap.sum(-1),
            "top1": (logits.argmax(-1) == ids[:, 0]).astype(np.float64)}


def test_position_metrics_match_reference():
    student, ids, lp = topk_case(np.random.default_rng(0))
    student[0] = 0.0
    student[0, ids[0, 0]] = 1.0  # at least one top-1 agreement
    got = position_metrics(jnp.asarray(student), jnp.asarray(ids), jnp.asarray(lp))
    want = np_position_metrics(student, ids, lp)
    rows = [0, 1, 2, 3, 5, 6, 7]  # row 4 has no target (all slots unused): never scored
    for name in metrics.METRICS:
        np.testing.assert_allclose(np.asarray(got[name])[rows], want[name][rows], atol=1e-6,
                                   err_msg=name)
    assert want["top1"][0] == 1.0
    tvd = jax_divergence(student, ids, lp, "tvd", 1.0)
    np.testing.assert_allclose(got["alpha_upper"], 1.0 - tvd, atol=1e-6)


def test_alpha_bounds_meet_the_dense_overlap_at_k_equals_v():
    teacher_logits, student, ids, lp = full_vocab_case(np.random.default_rng(1))
    got = position_metrics(jnp.asarray(student), jnp.asarray(ids), jnp.asarray(lp))
    dense = np.minimum(np_softmax(teacher_logits), np_softmax(student.astype(np.float64)))
    np.testing.assert_allclose(got["alpha_lower"], dense.sum(-1), atol=1e-6)
    np.testing.assert_allclose(got["alpha_upper"], dense.sum(-1), atol=1e-6)


def test_sums_per_offset_match_reference():
    rng = np.random.default_rng(2)
    b, seq, d, v, k, gamma = 2, 11, 8, 30, 4, 3
    hidden = rng.normal(size=(b, seq, d)).astype(np.float32)
    head = (rng.normal(size=(d, v)) / np.sqrt(d)).astype(np.float32)
    ids = np.stack([rng.permutation(v)[:k] for _ in range(b * seq)]).reshape(b, seq, k)
    lp = np.sort(np.log(rng.dirichlet(np.ones(v), size=(b, seq))[..., :k]), -1)[..., ::-1]
    offset = rng.integers(-1, gamma + 2, size=(b, seq))  # offsets >= gamma are not counted
    sums = metrics.drafter_metric_sums(
        jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(ids, jnp.int32),
        jnp.asarray(lp.copy(), jnp.float32), jnp.asarray(offset, jnp.int32), gamma=gamma,
        chunk_size=4)
    logits = (hidden.astype(np.float64) @ head).reshape(-1, v)
    per_position = np_position_metrics(logits, ids.reshape(-1, k), lp.reshape(-1, k))
    flat_offset = offset.reshape(-1)
    np.testing.assert_array_equal(sums["count"], [np.sum(flat_offset == j) for j in range(gamma)])
    for name in metrics.METRICS:
        want = [per_position[name][flat_offset == j].sum() for j in range(gamma)]
        np.testing.assert_allclose(sums[name], want, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("alpha, gamma, want", [
    (0.5, 4, (1 - 0.5 ** 5) / 0.5), (0.8, 8, (1 - 0.8 ** 9) / 0.2), (0.0, 4, 1.0),
    (1.0, 4, 5.0), (1.0, 16, 17.0), (1 - 1e-9, 4, 5.0)])
def test_expected_tokens_per_call(alpha, gamma, want):
    assert metrics.expected_tokens_per_call(alpha, gamma) == pytest.approx(want, rel=1e-8)


def test_expected_tokens_per_call_on_arrays():
    alpha = np.array([0.25, 0.5, 1.0])
    np.testing.assert_allclose(metrics.expected_tokens_per_call(jnp.asarray(alpha), 2),
                               [1.3125, 1.75, 3.0], rtol=1e-6)


def test_summarize_means_per_offset_and_per_gamma():
    sums = {"kl": [2.0, 1.0, 0.0, 0.0], "alpha_lower": [1.5, 0.6, 0.0, 0.0],
            "alpha_upper": [1.8, 0.9, 0.0, 0.0], "top1": [2.0, 0.0, 0.0, 0.0],
            "count": [2.0, 1.0, 0.0, 0.0]}
    out = metrics.summarize({n: np.asarray(v) for n, v in sums.items()}, (2, 4))
    assert out["by_offset"]["alpha_lower"] == [0.75, pytest.approx(0.6), None, None]
    assert out["gamma=2"]["alpha_upper"] == pytest.approx(0.9)
    assert out["gamma=2"]["top1"] == pytest.approx(2 / 3)
    assert out["gamma=4"]["E_lower"] == pytest.approx(metrics.expected_tokens_per_call(0.7, 4))
    with pytest.raises(ValueError, match="gamma 5"):
        metrics.summarize(sums, (5,))


def test_drafting_condition_end_to_end_counts():
    """drafting_batch -> metric sums: per-offset counts are the scored positions."""
    rng = np.random.default_rng(3)
    batch = packed_batch(rng, rows=3, seq=40, segments=SEGMENTS)
    noisy, offset = masking.drafting_batch(batch, 0, 4, mask_token_id=MASK)
    b, seq, d, v, k = 3, 40, 8, 30, 4
    ids = np.tile(np.arange(k, dtype=np.int32), (b, seq, 1))
    lp = np.tile(np.log([0.4, 0.3, 0.2, 0.05]).astype(np.float32), (b, seq, 1))
    hidden = jnp.asarray(rng.normal(size=(b, seq, d)), jnp.bfloat16)
    sums = metrics.drafter_metric_sums(hidden, jnp.asarray(rng.normal(size=(d, v)), jnp.float32),
                                       jnp.asarray(ids), jnp.asarray(lp), offset, gamma=4,
                                       chunk_size=16)
    np.testing.assert_array_equal(sums["count"],
                                  [np.sum(np.asarray(offset) == j) for j in range(4)])
    assert np.sum(np.asarray(noisy) == MASK) > 0
    assert np.all(np.asarray(sums["alpha_lower"]) <= np.asarray(sums["alpha_upper"]) + 1e-6)
