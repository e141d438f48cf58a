"""Sparse top-k divergences against float64 NumPy references; chunked vs dense LM-head loss."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax.distill import chunked_head, divergences, loss
from tests.helpers import (full_vocab_case, jax_divergence, np_buckets, np_divergence,
                           np_plogratio, np_softmax, topk_case)

KINDS = divergences.KINDS


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_k_equals_v_is_the_dense_divergence(kind, temperature):
    teacher_logits, student, ids, lp = full_vocab_case(np.random.default_rng(0))
    want = np_divergence(np_softmax(teacher_logits / temperature),
                         np_softmax(student.astype(np.float64) / temperature), kind)
    got = jax_divergence(student, ids, lp, kind, temperature)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("kind", KINDS)
def test_top_k_matches_bucket_reference(kind, temperature):
    student, ids, lp = topk_case(np.random.default_rng(1))
    p, q = np_buckets(student, ids, lp, temperature)
    got = jax_divergence(student, ids, lp, kind, temperature)
    np.testing.assert_allclose(got, np_divergence(p, q, kind), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.9])
def test_jsd_beta(beta):
    student, ids, lp = topk_case(np.random.default_rng(2))
    p, q = np_buckets(student, ids, lp, 1.0)
    got = jax_divergence(student, ids, lp, "jsd", 1.0, beta)
    np.testing.assert_allclose(got, np_divergence(p, q, "jsd", beta), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_gradient_k_equals_v_is_q_minus_p(temperature):
    teacher_logits, student, ids, lp = full_vocab_case(np.random.default_rng(3))
    grad = jax.grad(lambda x: jax_divergence(x, ids, lp, "kl", temperature).sum())(
        jnp.asarray(student))
    want = (np_softmax(student.astype(np.float64) / temperature)
            - np_softmax(teacher_logits / temperature)) / temperature
    np.testing.assert_allclose(grad, want, rtol=0, atol=1e-6)


def test_forward_kl_gradient_with_tail_bucket():
    """d KL / d z_v = (q_v - p_v) / T on S and q_v (1 - p_tail / q_tail) / T off S."""
    student, ids, lp = topk_case(np.random.default_rng(4))
    temperature = 1.5
    grad = jax.grad(lambda x: jax_divergence(x, ids, lp, "kl", temperature).sum())(
        jnp.asarray(student))
    p, q_buckets = np_buckets(student, ids, lp, temperature)
    q = np_softmax(student.astype(np.float64) / temperature)
    want = q * (1.0 - p[:, -1:] / q_buckets[:, -1:])
    for row in range(len(ids)):
        for slot, token in enumerate(ids[row]):
            if lp[row, slot] > -np.inf:
                want[row, token] = q[row, token] - p[row, slot]
    np.testing.assert_allclose(grad, want / temperature, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_no_nan_in_values_or_grads_on_edge_rows(kind):
    """Unused slots, zero-tail rows, all-unused rows, a student almost sure of one token."""
    student, ids, lp = topk_case(np.random.default_rng(5))
    student[5] = 0.0
    student[5, ids[5, 0]] = 60.0
    value, grad = jax.value_and_grad(lambda x: jax_divergence(x, ids, lp, kind, 1.0).sum())(
        jnp.asarray(student))
    assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_confident_student_keeps_an_accurate_tail():
    """q_tail ~ 1e-21 underflows 1 - sum_S q in fp32; the KL must still be finite and exact."""
    v, k = 40, 6
    student = np.zeros((1, v), np.float32)
    student[0, 0] = 50.0
    ids = np.arange(k, dtype=np.int32)[None]
    lp = np.log(np.array([[0.5, 0.2, 0.1, 0.05, 0.03, 0.02]], np.float32))
    p_tail = 1 - np.exp(lp.astype(np.float64)).sum()
    q = np_softmax(student.astype(np.float64))
    q_tail = (v - k) / (np.exp(50.0) + v - 1)
    p = np.concatenate([np.exp(lp.astype(np.float64)), [[p_tail]]], -1)
    want = np_plogratio(p, np.concatenate([q[:, :k], [[q_tail]]], -1)).sum()
    got = jax_divergence(student, ids, lp, "kl", 1.0)
    np.testing.assert_allclose(got, [want], rtol=1e-5)


def loss_inputs(rng, b=2, seq=10, d=8, v=48, k=5, dtype=jnp.float32):
    hidden = jnp.asarray(rng.normal(size=(b, seq, d)), dtype)
    head = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), jnp.float32)
    ids = np.stack([rng.permutation(v)[:k] for _ in range(b * seq)]).reshape(b, seq, k)
    lp = np.sort(np.log(rng.dirichlet(np.ones(v), size=(b, seq))[..., :k]), -1)[..., ::-1].copy()
    lp[0, 3, 2:] = -np.inf
    ids[0, 3, 2:] = 0
    mask = rng.random((b, seq)) < 0.7
    return (hidden, head, jnp.asarray(ids, jnp.int32), jnp.asarray(lp, jnp.float32),
            jnp.asarray(mask))


# How the LM head is cut: sequence chunks of 4 over L = 10 (4 + 4 + 2 padded), the head gradient
# added in one tile of V = 48 or in tiles of 7 (6 x 7 + a remainder of 6); vocabulary tiles of 7
# over V = 48 (the last tile moved back to overlap its predecessor) and of 16 (exact).
CUTS = {"sequence": dict(chunk_axis="sequence", chunk_size=4),
        "sequence_tiles7": dict(chunk_axis="sequence", chunk_size=4, vocab_tile=7),
        "vocab7": dict(chunk_axis="vocab", vocab_tile=7),
        "vocab16": dict(chunk_axis="vocab", vocab_tile=16)}


@pytest.mark.parametrize("kind, cut", [(kind, cut) for kind in KINDS for cut in CUTS
                                       if cut in ("sequence", "vocab7") or kind == "kl"])
def test_chunked_matches_dense_values_and_grads(kind, cut):
    hidden, head, ids, lp, mask = loss_inputs(np.random.default_rng(7))

    def grads(fn, **kw):
        return jax.jit(jax.value_and_grad(
            lambda h, w: fn(h, w, ids, lp, mask, kind=kind, temperature=1.3, **kw),
            argnums=(0, 1), has_aux=True))(hidden, head)

    (s_chunk, c_chunk), g_chunk = grads(loss.distill_loss, **CUTS[cut])
    (s_dense, c_dense), g_dense = grads(loss.dense_distill_loss)
    assert c_chunk == c_dense == np.sum(np.asarray(mask))
    # fp32 vs fp32 with sums taken in another order: within 1e-6 per position.
    np.testing.assert_allclose(s_chunk, s_dense, rtol=0, atol=1e-6 * float(c_dense))
    for a, b in zip(g_chunk, g_dense):  # fp32 rounding, relative to the gradient's scale
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("counts", [(0, 0, 0), (2, 0, 1), (4, 3, 0), (7, 5, 6), (8, 8, 2),
                                    (19, 11, 16), (21, 21, 21)])
def test_sequence_loss_runs_only_the_chunks_its_loss_positions_need(counts):
    """The sequence cut gathers each row's loss positions to its front and runs whole chunks of 8
    then the rest in 2, 4 or 8 columns (L = 21): per-row counts hitting each case (none; rest 2,
    4, 7; exactly one chunk; two chunks + 3; every position), positions scattered over the row.
    Values and both gradients equal the dense loss; positions outside the loss get d hidden 0."""
    rng = np.random.default_rng(sum(counts))
    hidden, head, ids, lp, _ = loss_inputs(rng, b=3, seq=21)
    mask = np.zeros((3, 21), bool)
    for row, n in enumerate(counts):
        mask[row, rng.permutation(21)[:n]] = True

    def grads(fn, **kw):
        return jax.jit(jax.value_and_grad(
            lambda h, w: fn(h, w, ids, lp, jnp.asarray(mask), kind="kl", **kw),
            argnums=(0, 1), has_aux=True))(hidden, head)

    (s_chunk, c_chunk), (gh_chunk, gw_chunk) = grads(loss.distill_loss, chunk_axis="sequence",
                                                     chunk_size=8, vocab_tile=7)
    (s_dense, c_dense), (gh_dense, gw_dense) = grads(loss.dense_distill_loss)
    assert c_chunk == c_dense == sum(counts)
    np.testing.assert_allclose(s_chunk, s_dense, rtol=0, atol=1e-6 * max(1, sum(counts)))
    np.testing.assert_allclose(gh_chunk, gh_dense, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gw_chunk, gw_dense, rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(gh_chunk)[~mask])
    assert (np.count_nonzero(np.abs(np.asarray(gh_chunk)).sum(-1)) == sum(counts))


@pytest.mark.parametrize("kind, cut", [(kind, "vocab7") for kind in KINDS] + [("kl", "sequence")])
def test_k_equals_v_through_the_head_is_the_dense_divergence(kind, cut):
    """Teacher = a full softmax as k = V sorted log-probs: the loss through the chunked head is
    the dense divergence of float64 NumPy softmaxes (<= 1e-6 per position), at T = 2."""
    rng = np.random.default_rng(11)
    b, seq, d, v, temperature = 2, 5, 8, 24, 2.0
    hidden = rng.normal(size=(b, seq, d)).astype(np.float32)
    head = (rng.normal(size=(d, v)) / np.sqrt(d)).astype(np.float32)
    logits = hidden.astype(np.float64) @ head.astype(np.float64)
    teacher_logits = logits + rng.normal(size=logits.shape)
    teacher_lp = np.log(np_softmax(teacher_logits))
    ids = np.argsort(-teacher_lp, -1).astype(np.int32)
    lp = np.take_along_axis(teacher_lp, ids, -1).astype(np.float32)
    mask = np.ones((b, seq), bool)
    per_position = np_divergence(np_softmax(teacher_logits / temperature),
                                 np_softmax(logits / temperature), kind)
    s, c = loss.distill_loss(hidden, head, ids, lp, mask, kind=kind, temperature=temperature,
                             **CUTS[cut])
    assert c == b * seq
    np.testing.assert_allclose(s, per_position.sum(), rtol=0, atol=1e-6 * b * seq)


@pytest.mark.parametrize("cut", ["sequence", "vocab7"])
def test_k_equals_v_kl_gradients_through_the_head(cut):
    """d KL / d logits = (q - p) / T, so d hidden = g head^T and d head = hidden^T g (float64)."""
    rng = np.random.default_rng(12)
    b, seq, d, v, temperature = 2, 5, 8, 24, 1.5
    hidden = rng.normal(size=(b, seq, d)).astype(np.float32)
    head = (rng.normal(size=(d, v)) / np.sqrt(d)).astype(np.float32)
    logits = hidden.astype(np.float64) @ head.astype(np.float64)
    teacher_logits = logits + rng.normal(size=logits.shape)
    ids = np.argsort(-teacher_logits, -1).astype(np.int32)
    lp = np.take_along_axis(np.log(np_softmax(teacher_logits)), ids, -1).astype(np.float32)
    mask = np.ones((b, seq), bool)
    g_hidden, g_head = jax.grad(lambda h, w: loss.distill_loss(
        h, w, ids, lp, mask, temperature=temperature, **CUTS[cut])[0], argnums=(0, 1))(
        hidden, head)
    g_logits = (np_softmax(logits / temperature) - np_softmax(teacher_logits / temperature))
    g_logits /= temperature
    np.testing.assert_allclose(g_hidden, g_logits @ head.T.astype(np.float64), atol=1e-6)
    np.testing.assert_allclose(g_head, np.einsum("bld,blv->dv", hidden, g_logits), atol=1e-6)


def test_vocab_tiled_stats_equal_the_dense_stats_ties_to_the_lowest_id():
    """Tiles of 5 over V = 23; columns 3 and 17 of the head are equal (a tie across tiles) and
    the largest, so the argmax must be 3 as in jnp.argmax."""
    hidden, head, ids, lp, _ = loss_inputs(np.random.default_rng(13), v=23)
    head = np.array(head)
    head[:, 3] = head[:, 17] = 10.0 * np.abs(head).max()
    hidden = jnp.abs(hidden)
    valid = lp > -jnp.inf
    tiled = chunked_head.vocab_tiled_stats(hidden, head, ids, valid, temperature=0.8, vocab_tile=5)
    dense = divergences.student_stats(hidden @ head, ids, valid, temperature=0.8)
    np.testing.assert_array_equal(tiled.top1, np.full(tiled.top1.shape, 3))
    np.testing.assert_array_equal(tiled.top1, dense.top1)
    np.testing.assert_allclose(np.where(valid, tiled.z_at_ids, 0),
                               np.where(valid, dense.z_at_ids, 0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(tiled.log_norm, dense.log_norm, rtol=1e-6)
    np.testing.assert_allclose(tiled.log_tail, dense.log_tail, rtol=1e-6)


def test_loss_is_the_masked_sum_of_reference_divergences_bf16_hidden():
    hidden, head, ids, lp, mask = loss_inputs(np.random.default_rng(8), dtype=jnp.bfloat16)
    s, c = loss.distill_loss(hidden, head, ids, lp, mask, kind="kl", temperature=1.3,
                             chunk_size=3)
    logits = np.asarray(hidden, np.float64) @ np.asarray(head, np.float64)
    p, q = np_buckets(logits.reshape(-1, logits.shape[-1]), np.asarray(ids).reshape(-1, 5),
                      np.asarray(lp).reshape(-1, 5), 1.3)
    per_position = np_divergence(p, q, "kl").reshape(mask.shape)
    assert s.dtype == c.dtype == jnp.float32
    np.testing.assert_allclose(s, per_position[np.asarray(mask)].sum(), rtol=1e-5)


def grad_temp_bytes(fn, b, seq, d, v, k, **kw) -> int:
    """Compiled temporary bytes of d loss / d (hidden, head) for abstract fp32 inputs."""
    args = (jax.ShapeDtypeStruct((b, seq, d), jnp.float32),
            jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((b, seq, k), jnp.int32),
            jax.ShapeDtypeStruct((b, seq, k), jnp.float32),
            jax.ShapeDtypeStruct((b, seq), jnp.bool_))
    grad = jax.grad(lambda h, w, *rest: fn(h, w, *rest, **kw)[0], argnums=(0, 1))
    return jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("cut", [dict(chunk_axis="sequence", chunk_size=32),
                                 dict(chunk_axis="vocab", vocab_tile=512)])
def test_chunked_grad_uses_far_less_memory_than_dense(cut):
    b, seq, d, v, k = 2, 512, 32, 8192, 8
    chunked = grad_temp_bytes(loss.distill_loss, b, seq, d, v, k, **cut)
    dense = grad_temp_bytes(loss.dense_distill_loss, b, seq, d, v, k)
    logits_bytes = b * seq * v * 4
    assert dense > logits_bytes  # the dense version really holds [B, L, V] logits
    assert chunked * 8 < dense, (chunked, dense)


def test_sequence_loss_holds_no_second_head_sized_buffer():
    """The head gradient is accumulated in place across every chunk loop (whole chunks, then
    the half and quarter pieces): the compiled temporaries stay under one [D, V] head (a copy
    of the accumulator between loops would add a whole head)."""
    d, v = 256, 8192
    temp = grad_temp_bytes(loss.distill_loss, 1, 300, d, v, 8, chunk_axis="sequence",
                           chunk_size=16)
    assert temp < d * v * 4, (temp, d * v * 4)


@pytest.mark.parametrize("cut", list(CUTS))
def test_confident_student_tail_through_the_head_values_and_grads(cut):
    """Rows whose tail logits sit 120 nats under the top (exp underflows fp32 there): the loss
    and d logits still match float64 references, the d logits in closed form
    q_v - p_v [v in S] - p_tail q_v / q_tail [v not in S] (KL, T = 1)."""
    rng = np.random.default_rng(11)
    b, seq, v, k = 1, 6, 48, 5
    logits = rng.normal(size=(b, seq, v))
    ids = np.stack([rng.permutation(v)[:k] for _ in range(seq)]).reshape(b, seq, k)
    logits[0, :3] -= 120.0  # rows 0-2: the student is sure of its top teacher id ...
    for pos in range(3):
        logits[0, pos, ids[0, pos, 0]] += 120.0
    lp = np.log(np.array([0.4, 0.2, 0.1, 0.05, 0.05]))[None, None].repeat(seq, 1)  # p_tail 0.2
    head = jnp.eye(v, dtype=jnp.float32)  # hidden @ head = the logits
    args = (jnp.asarray(ids, jnp.int32), jnp.asarray(lp, jnp.float32),
            jnp.ones((b, seq), bool))
    hidden = jnp.asarray(logits, jnp.float32)
    (total, _), grad = jax.value_and_grad(
        lambda h: loss.distill_loss(h, head, *args, **CUTS[cut]), has_aux=True)(hidden)

    z = np.asarray(hidden, np.float64)[0]
    log_norm = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    in_s = np.zeros_like(z, bool)
    np.put_along_axis(in_s, ids[0], True, -1)
    z_tail = np.where(in_s, -np.inf, z)
    log_tail = np.log(np.exp(z_tail - z_tail.max(-1, keepdims=True)).sum(-1)) + z_tail.max(-1)
    p_s, p_tail = np.exp(lp[0]), 1.0 - np.exp(lp[0]).sum(-1)
    logq_s = np.take_along_axis(z, ids[0], -1) - log_norm[:, None]
    want = (p_s * (lp[0] - logq_s)).sum() + (p_tail * (np.log(p_tail) - (log_tail - log_norm))).sum()
    q = np.exp(z - log_norm[:, None])
    p_v = np.zeros_like(z)
    np.put_along_axis(p_v, ids[0], p_s, -1)
    want_grad = q - p_v - np.where(in_s, 0.0, p_tail[:, None] * np.exp(z - log_tail[:, None]))
    assert log_tail[0] - log_norm[0] < -100  # the case is as deep as intended
    np.testing.assert_allclose(total, want, rtol=1e-5)
    np.testing.assert_allclose(grad[0], want_grad, rtol=1e-4, atol=1e-6)


def test_bad_kind_and_beta_are_reported():
    hidden, head, ids, lp, mask = loss_inputs(np.random.default_rng(9))
    with pytest.raises(ValueError, match="loss.kind"):
        loss.distill_loss(hidden, head, ids, lp, mask, kind="kld")
    with pytest.raises(ValueError, match="beta"):
        loss.distill_loss(hidden, head, ids, lp, mask, kind="jsd", beta=1.0)
    with pytest.raises(ValueError, match="loss.chunk_axis"):
        loss.distill_loss(hidden, head, ids, lp, mask, chunk_axis="rows")


@pytest.mark.parametrize("cut", ["sequence", "vocab7"])
def test_batch_sharded_over_devices_gives_the_same_loss_and_grads(cut):
    """Both cuts keep all rows in every piece, so a batch axis sharded 8 ways stays sharded."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    hidden, head, ids, lp, mask = loss_inputs(np.random.default_rng(10), b=8)
    fn = jax.jit(jax.value_and_grad(
        lambda h, w, i, l_, m: loss.distill_loss(h, w, i, l_, m, **CUTS[cut]),
        argnums=(0, 1), has_aux=True))
    sharded = [jax.device_put(x, batch_sharding) for x in (hidden, ids, lp, mask)]
    (s_sharded, c_sharded), g_sharded = fn(sharded[0], head, *sharded[1:])
    (s_single, c_single), g_single = fn(hidden, head, ids, lp, mask)
    assert c_sharded == c_single
    np.testing.assert_allclose(s_sharded, s_single, rtol=1e-6)
    for a, b in zip(g_sharded, g_single):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert g_sharded[0].sharding.spec[0] == "data"
