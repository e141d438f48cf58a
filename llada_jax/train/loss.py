"""Sparse top-k distillation losses with a tail bucket, computed through the LM head in chunks.

Per target position the teacher is known on its top-k set S (student-vocab ids, log-probs at
T = 1) plus a tail bucket tau holding the remaining mass p_tau = 1 - sum_S p_i. The student's full
distribution q = softmax(logits / T) is collapsed onto the same K + 1 buckets, and a divergence is
taken between the two (K + 1)-bucket distributions. With S = the whole vocabulary this is exactly
the dense divergence (the tail bucket is empty on both sides).

Temperature on the teacher side: only the top-k log-probs and the tail mass are stored, so the
tempered teacher is softmax((log p_i / T)_S, log p_tau / T), treating the tail as one token. That
is exact for T = 1 and for k = V; for other T and k < V it approximates the tempered tail (the true
tempered tail mass is sum_{j in tail} p_j^(1/T) / Z, which the stored record cannot give). No T^2
factor is applied (the original did not use one).

The [B, L, V] logits are never materialised. The student's side of every loss and metric only
needs, per position, its tempered logits at the teacher's ids, the log-normaliser, the log-mass off
the teacher's ids and the argmax (`StudentStats`), and the loss gets them through the LM head in
one of two cuts:
- chunk_axis="sequence" (the default config): each row's loss positions are gathered to its
  front, then a loop runs over sequence chunks (all rows at once) only as far as the fullest
  row's loss positions reach, the rest in pieces of 1/2 and 1/4 of a chunk: prompt,
  padding and positions outside the loss cost no head FLOPs. Each chunk makes its [B, chunk, V]
  logits once. The gradient is written in closed form in
  the same pass (a custom VJP), so the head costs 3 matmuls (logits, d hidden, d head) where
  autodiff under remat needs 4, and each logits buffer is read ~7 times in all; the head
  gradient is added tile by tile, so no head-sized temporary exists. At the 8B head (B = 1,
  L = 4096, V = 126464, chunk 256) its temporary memory is 1/21 of a dense loss
  (bench/loss_memory.py). With the batch sharded over devices, each chunk's head gradient is
  reduced across them, once per chunk.
- chunk_axis="vocab": a `lax.scan` over vocabulary tiles of the head, all positions at once,
  with running logsumexps, gathers and argmax, under `jax.checkpoint` (4 head matmuls). Temporary
  memory is a few [B, L, tile] buffers (1/17 of dense at tile 4096) and the head gradient is
  reduced across devices once, tile by tile: the cut for a large per-chip batch on a TPU slice
  (configs/llada_8b.py).
The metrics (no gradient) use sequence chunks of materialised logits (`chunked_position_sums`).
Results are (sum, count) pairs so they add up across microbatches and hosts.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

KINDS = ("kl", "reverse_kl", "jsd", "tvd")
CHUNK_AXES = ("sequence", "vocab")  # how distill_loss cuts the LM head
# Reverse KL needs log p where q > 0. A teacher bucket with zero mass (the tail of a renormalised
# top-5 record) would make it infinite; such buckets are given this probability instead.
REVERSE_KL_TEACHER_FLOOR = 1e-8
# Stored top-k log-probs are fp32: a renormalised top-5 record sums to 1 only up to ~K ulps, so a
# teacher tail below this is rounding noise and counts as an empty bucket (it matters for
# reverse KL, where an empty teacher bucket is floored rather than taken at ~1e-7).
TEACHER_TAIL_MIN = 1e-6
NEG_INF = -jnp.inf
# Default head columns per vocabulary tile: temp memory grows with it (about 7 fp32 [B, L, tile]
# buffers), while smaller tiles mean more scan steps; on CPU 4096 was the fastest at the
# benchmark shape (B = 2, L = 512, D = 512, V = 126464) and 2048 was ~35% slower.
VOCAB_TILE = 4096

# logits_bcv, teacher_ids_bck, teacher_logprobs_bck -> {name: [B, C] float32 per-position value}
StatFn = Callable[[jax.Array, jax.Array, jax.Array], dict[str, jax.Array]]


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x <= 0 (larger x is clamped to 0, giving -inf), stable on both ends."""
    x = jnp.minimum(x, 0.0)
    return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _safe_logsumexp(x: jax.Array) -> jax.Array:
    """logsumexp over the last axis; -inf with a zero (not NaN) gradient for an all -inf slice."""
    empty = jnp.all(x == NEG_INF, axis=-1)
    out = jax.nn.logsumexp(jnp.where(empty[..., None], 0.0, x), axis=-1)
    return jnp.where(empty, NEG_INF, out)


def _safe_logaddexp(a: jax.Array, b: jax.Array) -> jax.Array:
    """logaddexp that keeps -inf (and a zero gradient) where both inputs are -inf."""
    both = (a == NEG_INF) & (b == NEG_INF)
    out = jnp.logaddexp(jnp.where(both, 0.0, a), jnp.where(both, 0.0, b))
    return jnp.where(both, NEG_INF, out)


def _student_tail_logits(z_nv: jax.Array, ids_nk: jax.Array, valid_nk: jax.Array) -> jax.Array:
    """z with the top-k ids set to -inf (unused slots leave the vocab untouched): [N, V].

    A per-row scatter (vmap), so rows sharded over devices need no collectives.
    """
    vocab = z_nv.shape[-1]
    return jax.vmap(lambda z_v, ids_k: z_v.at[ids_k].set(NEG_INF, mode="drop"))(
        z_nv, jnp.where(valid_nk, ids_nk, vocab))


class StudentStats(NamedTuple):
    """The student's tempered logits z = logits / T reduced to what the losses and metrics need.

    float32 except top1; shapes [...] per position, [..., K] per teacher slot.
    """
    z_at_ids: jax.Array   # [..., K] z at the teacher's ids (unused slots: any finite value)
    log_norm: jax.Array   # [...] logsumexp of z over the vocabulary
    log_tail: jax.Array   # [...] logsumexp of z off the teacher's ids; -inf if they cover V
    top1: jax.Array | None  # [...] int32 argmax of z (the greedy token); None if not asked for


def student_stats(logits_nv: jax.Array, teacher_ids_nk: jax.Array, valid_nk: jax.Array,
                  temperature: float = 1.0) -> StudentStats:
    """`StudentStats` from materialised logits [..., V] (any float dtype); ids, valid [..., K].

    The tail is a logsumexp over the complement of S (not log(1 - sum_S q)): it stays accurate
    when the student puts almost all its mass on S, where 1 - sum_S q rounds to 0 in fp32 and a
    KL against a teacher tail would become infinite.
    """
    lead, k = logits_nv.shape[:-1], teacher_ids_nk.shape[-1]
    z_nv = logits_nv.reshape(-1, logits_nv.shape[-1]).astype(jnp.float32) / temperature
    ids_nk = teacher_ids_nk.reshape(-1, k)
    stats = StudentStats(
        z_at_ids=jnp.take_along_axis(z_nv, ids_nk, axis=-1),
        log_norm=jax.nn.logsumexp(z_nv, axis=-1),
        log_tail=_safe_logsumexp(_student_tail_logits(z_nv, ids_nk, valid_nk.reshape(-1, k))),
        top1=jnp.argmax(z_nv, axis=-1).astype(jnp.int32))
    return jax.tree.map(lambda x: x.reshape(*lead, *x.shape[1:]), stats)


def bucket_logprobs_from_stats(stats: StudentStats, teacher_logprobs_nk: jax.Array,
                               temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Teacher and student log-probabilities over the K + 1 buckets S ∪ {tail}, in fp32.

    teacher_logprobs_nk [..., K]: teacher log-probs at T = 1, -inf in unused slots.
    Returns (logp, logq), each [..., K + 1] with the tail last; -inf marks an empty bucket.
    """
    teacher_lp = jax.lax.stop_gradient(teacher_logprobs_nk.astype(jnp.float32))
    logq_s = jnp.where(teacher_lp > NEG_INF, stats.z_at_ids - stats.log_norm[..., None], NEG_INF)
    logq_tail = stats.log_tail - stats.log_norm

    # If S covers the whole student vocabulary there is no tail: rounding in the stored
    # log-probs must not leave mass in a bucket the student cannot reach.
    teacher_tail = _log1mexp(jax.nn.logsumexp(teacher_lp, axis=-1))
    teacher_tail = jnp.where((logq_tail == NEG_INF) | (teacher_tail < math.log(TEACHER_TAIL_MIN)),
                             NEG_INF, teacher_tail)
    logp = jax.nn.log_softmax(
        jnp.concatenate([teacher_lp, teacher_tail[..., None]], axis=-1) / temperature, axis=-1)
    return logp, jnp.concatenate([logq_s, logq_tail[..., None]], axis=-1)


def bucket_logprobs(logits_nv: jax.Array, teacher_ids_nk: jax.Array,
                    teacher_logprobs_nk: jax.Array, temperature: float = 1.0
                    ) -> tuple[jax.Array, jax.Array]:
    """`bucket_logprobs_from_stats` of materialised student logits [..., V] (any float dtype);
    teacher_ids_nk [..., K] int. Returns (logp, logq), each [..., K + 1], tail last."""
    stats = student_stats(logits_nv, teacher_ids_nk, teacher_logprobs_nk > NEG_INF, temperature)
    return bucket_logprobs_from_stats(stats, teacher_logprobs_nk, temperature)


def _plogratio(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """Elementwise p (log p - log q) with 0 log 0 = 0 and a NaN-free gradient."""
    present = logp > NEG_INF
    lp = jnp.where(present, logp, 0.0)
    lq = jnp.where(present, logq, 0.0)
    return jnp.where(present, jnp.exp(lp) * (lp - lq), 0.0)


def divergence(logp: jax.Array, logq: jax.Array, kind: str = "kl",
               beta: float = 0.5) -> jax.Array:
    """Divergence of student q from teacher p, both log-probs over buckets [..., K+1] -> [...].

    kind: 'kl' = KL(p || q) (forward, the original loss); 'reverse_kl' = KL(q || p), with empty
    teacher buckets floored at REVERSE_KL_TEACHER_FLOOR; 'jsd' = beta KL(p || m) +
    (1 - beta) KL(q || m), m = beta p + (1 - beta) q, 0 < beta < 1; 'tvd' = 0.5 sum |p - q|
    (= 1 - alpha_upper, the acceptance-rate gap).
    """
    if kind == "kl":
        return jnp.sum(_plogratio(logp, logq), axis=-1)
    if kind == "reverse_kl":
        floored = jnp.where(logp == NEG_INF, math.log(REVERSE_KL_TEACHER_FLOOR), logp)
        return jnp.sum(_plogratio(logq, floored), axis=-1)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd needs 0 < beta < 1, got beta={beta}")
        logm = _safe_logaddexp(math.log(beta) + logp, math.log1p(-beta) + logq)
        return (beta * jnp.sum(_plogratio(logp, logm), axis=-1)
                + (1.0 - beta) * jnp.sum(_plogratio(logq, logm), axis=-1))
    if kind == "tvd":
        return 0.5 * jnp.sum(jnp.abs(jnp.exp(logp) - jnp.exp(logq)), axis=-1)
    raise ValueError(f"unknown loss kind {kind!r}: choose one of {', '.join(KINDS)} "
                     "(config field loss.kind)")


def _pad_seq(x: jax.Array, pad: int, value) -> jax.Array:
    widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, widths, constant_values=value)


def _to_chunks(x: jax.Array, n_chunks: int) -> jax.Array:
    """[B, n*C, ...] -> [n, B, C, ...] (the batch axis stays put, so its sharding does too)."""
    b, l = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, n_chunks, l // n_chunks, *x.shape[2:]), 1, 0)


def _bin_sums(values: dict[str, jax.Array], bin_bl: jax.Array, n_bins: int
              ) -> dict[str, jax.Array]:
    """{name: [B, C] per position} -> {name: [n_bins] sum, 'count': [n_bins]}; bin -1 = skip."""
    onehot_bcn = (bin_bl[..., None] == jnp.arange(n_bins)).astype(jnp.float32)
    counted = bin_bl >= 0
    sums = {name: jnp.einsum("bc,bcn->n", jnp.where(counted, v.astype(jnp.float32), 0.0),
                             onehot_bcn) for name, v in values.items()}
    sums["count"] = jnp.sum(onehot_bcn, axis=(0, 1))
    return sums


def chunked_position_sums(stat_fn: StatFn, hidden_bld: jax.Array, head_dv: jax.Array,
                          teacher_ids_blk: jax.Array, teacher_logprobs_blk: jax.Array,
                          bin_bl: jax.Array, *, n_bins: int, chunk_size: int
                          ) -> dict[str, jax.Array]:
    """Per-bin sums over positions of `stat_fn`'s values, with logits = hidden @ head per chunk.

    bin_bl: int [B, L], the bin 0..n_bins-1 each position adds to, -1 = not counted.
    Returns {name: [n_bins] float32 sum} for each statistic plus 'count': [n_bins] positions.

    Chunks run along the sequence (all rows at once), so a batch axis sharded over devices stays
    sharded inside every chunk. Each chunk's logits [B, chunk, V] are recomputed in the backward
    pass (jax.checkpoint), so peak memory holds one chunk's logits, not [B, L, V].
    """
    xs = _sequence_chunks(((hidden_bld, 0), (teacher_ids_blk, 0),
                           (teacher_logprobs_blk, NEG_INF), (bin_bl.astype(jnp.int32), -1)),
                          chunk_size)

    @jax.checkpoint
    def chunk_sums(head, h_bcd, ids_bck, lps_bck, bins_bc):
        logits_bcv = jnp.einsum("bcd,dv->bcv", h_bcd, head, preferred_element_type=jnp.float32)
        return _bin_sums(stat_fn(logits_bcv, ids_bck, lps_bck), bins_bc, n_bins)

    def body(carry, chunk_xs):
        return jax.tree.map(jnp.add, carry, chunk_sums(head_dv, *chunk_xs)), None

    init = jax.eval_shape(chunk_sums, head_dv, *(x[0] for x in xs))
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), init)
    sums, _ = jax.lax.scan(body, init, xs)
    return sums


def _max_sumexp(z_nv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(m, s) with logsumexp(z) = m + log(s) over the last axis; m carries no gradient (the sum
    does not depend on it). An all -inf row gives (-inf, 0) with no NaN."""
    m = jax.lax.stop_gradient(jnp.max(z_nv, axis=-1))
    return m, jnp.sum(jnp.exp(z_nv - jnp.where(m == NEG_INF, 0.0, m)[:, None]), axis=-1)


def _merge_sumexp(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array]
                  ) -> tuple[jax.Array, jax.Array]:
    """Online logsumexp: two (m, s) pairs -> the (m, s) of the union. Sums rescale in linear
    space, so rounding does not build up in the log as a chain of logaddexp would."""
    m = jnp.maximum(a[0], b[0])
    m_safe = jnp.where(m == NEG_INF, 0.0, m)
    return m, a[1] * jnp.exp(a[0] - m_safe) + b[1] * jnp.exp(b[0] - m_safe)


def _log_of_sumexp(m: jax.Array, s: jax.Array) -> jax.Array:
    """m + log(s), -inf (with a zero, not NaN, gradient) where s == 0."""
    empty = s == 0.0
    return jnp.where(empty, NEG_INF, jnp.where(empty, 0.0, m) + jnp.log(jnp.where(empty, 1.0, s)))


class _TileCarry(NamedTuple):
    """Running per-position statistics over the vocabulary tiles seen so far; [N] or [N, K]."""
    z_at_ids: jax.Array   # [N, K] z at the teacher ids seen so far, 0 elsewhere
    norm: tuple           # (max, sum) of exp over all columns; the max is also top1's value
    tail: tuple           # (max, sum) of exp over columns that are not teacher ids
    top1: jax.Array | None  # [N] int32 argmax so far (None: not asked for)


def vocab_tiled_stats(hidden_bld: jax.Array, head_dv: jax.Array, teacher_ids_blk: jax.Array,
                      valid_blk: jax.Array, *, temperature: float = 1.0,
                      vocab_tile: int = VOCAB_TILE, with_top1: bool = True) -> StudentStats:
    """`StudentStats` [B, L] of logits = hidden @ head, scanning the head in vocabulary tiles.

    hidden_bld [B, L, D]; head_dv [D, V]; teacher_ids_blk, valid_blk [B, L, K].
    Each tile's logits [B, L, tile] exist only inside a checkpointed scan body. The tile is cut
    from the head with a dynamic slice (not passed as scan inputs, which would copy the head), so
    the head gradient is written into its output slice by slice. When the tile does not divide V,
    the last tile is moved back to end at V and masks the columns its predecessor covered.
    with_top1=False leaves `top1` None: an argmax costs XLA:CPU about half a tile's matmul.
    """
    vocab = head_dv.shape[1]
    tile = max(1, min(int(vocab_tile), vocab))
    # d hidden is summed over tiles in the scan carry: keep it in the matmul's dtype (fp32 with
    # an fp32 head), not in a bf16 hidden's.
    h_bld = hidden_bld.astype(jnp.result_type(hidden_bld, head_dv))
    ids_blk = teacher_ids_blk.astype(jnp.int32)
    rows, k = h_bld.shape[0] * h_bld.shape[1], ids_blk.shape[-1]

    @jax.checkpoint
    def tile_stats(t):
        begin = t * tile
        start = jnp.minimum(begin, vocab - tile)
        head_dt = jax.lax.dynamic_slice_in_dim(head_dv, start, tile, axis=1)
        z_blt = jnp.einsum("bld,dt->blt", h_bld, head_dt,
                           preferred_element_type=jnp.float32) / temperature
        z_nt = jnp.where(start + jnp.arange(tile) >= begin, z_blt, NEG_INF).reshape(rows, tile)
        local_nk = (ids_blk - start).reshape(rows, k)
        here_nk = (valid_blk & (ids_blk >= begin) & (ids_blk < start + tile)).reshape(rows, k)
        z_at_ids = jnp.where(here_nk, jnp.take_along_axis(
            z_nt, jnp.clip(local_nk, 0, tile - 1), axis=-1), 0.0)
        top1 = start + jnp.argmax(z_nt, axis=-1).astype(jnp.int32) if with_top1 else None
        return _TileCarry(z_at_ids, _max_sumexp(z_nt),
                          _max_sumexp(_student_tail_logits(z_nt, local_nk, here_nk)), top1)

    def body(acc: _TileCarry, t):
        new = tile_stats(t)
        top1 = None
        if with_top1:  # strict >: on ties the lower id wins, as in jnp.argmax
            top1 = jnp.where(new.norm[0] > acc.norm[0], new.top1, acc.top1)
        return _TileCarry(acc.z_at_ids + new.z_at_ids, _merge_sumexp(acc.norm, new.norm),
                          _merge_sumexp(acc.tail, new.tail), top1), None

    empty = (jnp.full((rows,), NEG_INF, jnp.float32), jnp.zeros((rows,), jnp.float32))
    init = _TileCarry(jnp.zeros((rows, k), jnp.float32), empty, empty,
                      jnp.zeros((rows,), jnp.int32) if with_top1 else None)
    acc, _ = jax.lax.scan(body, init, jnp.arange(-(-vocab // tile), dtype=jnp.int32))
    lead = h_bld.shape[:2]
    return StudentStats(acc.z_at_ids.reshape(*lead, k), _log_of_sumexp(*acc.norm).reshape(lead),
                        _log_of_sumexp(*acc.tail).reshape(lead),
                        None if acc.top1 is None else acc.top1.reshape(lead))


def _scatter_rows(base_nv: jax.Array, ids_nk: jax.Array, values_nk: jax.Array, add: bool
                  ) -> jax.Array:
    """base with values set (or added) at each row's ids; ids == V are dropped. A per-row
    scatter (vmap), so rows sharded over devices need no collectives."""
    def one(b_v, i_k, x_k):
        return b_v.at[i_k].add(x_k, mode="drop") if add else b_v.at[i_k].set(x_k, mode="drop")
    return jax.vmap(one)(base_nv, ids_nk, values_nk)


def _chunk_loss_and_grads(h_bcd: jax.Array, head_dv: jax.Array, ids_bck: jax.Array,
                          lps_bck: jax.Array, mask_bc: jax.Array, *, kind: str,
                          temperature: float, beta: float, with_grads: bool):
    """Loss sum of one sequence chunk; with_grads, (loss sum, d hidden [B, C, D], (hidden
    [B*C, D], d loss / d logits [B*C, V])), the last pair for `_add_head_grad`.

    The chunk's logits [B*C, V] are made once and serve both the statistics and the gradient.
    The teacher's ids are overwritten with -inf in place, which leaves the tail logits: their
    max and sum of exp give log_tail exactly (no 1 - sum_S q cancellation, no underflow), and
    log_norm = logaddexp(log_tail, logsumexp of the K gathered logits). The gradient is written
    in closed form from the loss's gradients g w.r.t. those statistics:
      d loss / d z = exp(z - log_norm) g_norm + [v not in S] exp(z - log_tail) g_tail + g_ids,
    made from the same buffer, so the [B*C, V] array is passed over ~7 times in all (matmul,
    max, sum, gradient, two matmuls), which matters where memory bandwidth is the limit.
    """
    b, c, _ = h_bcd.shape
    vocab, k = head_dv.shape[1], ids_bck.shape[-1]
    rows = b * c
    h_nd = h_bcd.reshape(rows, -1)
    logits_nv = jnp.einsum("nd,dv->nv", h_nd, head_dv, preferred_element_type=jnp.float32)
    valid_nk = (lps_bck > NEG_INF).reshape(rows, k)
    drop_nk = jnp.where(valid_nk, ids_bck.reshape(rows, k), vocab)  # V: an unused slot
    z_at_ids = jnp.take_along_axis(logits_nv, jnp.minimum(drop_nk, vocab - 1), axis=-1)
    z_at_ids = z_at_ids / temperature
    # z off the teacher's ids (the tail), -inf on them; /T is applied as it is read.
    tail_nv = _scatter_rows(logits_nv, drop_nk, jnp.full(drop_nk.shape, NEG_INF), add=False)
    m_tail = jnp.max(tail_nv, axis=-1) / temperature
    shift = jnp.where(m_tail == NEG_INF, 0.0, m_tail)  # an empty tail: exp(-inf) = 0 everywhere
    s_tail = jnp.sum(jnp.exp(tail_nv / temperature - shift[:, None]), axis=-1)
    log_tail = _log_of_sumexp(m_tail, s_tail)
    log_norm = _safe_logaddexp(log_tail, _safe_logsumexp(
        jnp.where(valid_nk, z_at_ids, NEG_INF)))
    lps_nk = lps_bck.reshape(rows, k)
    mask_n = mask_bc.reshape(rows)

    def chunk_loss(z_at_ids, log_norm, log_tail):
        logp, logq = bucket_logprobs_from_stats(
            StudentStats(z_at_ids, log_norm, log_tail, None), lps_nk, temperature)
        return jnp.sum(jnp.where(mask_n, divergence(logp, logq, kind, beta), 0.0))

    if not with_grads:
        return chunk_loss(z_at_ids, log_norm, log_tail)
    total, vjp = jax.vjp(chunk_loss, z_at_ids, log_norm, log_tail)
    g_ids, g_norm, g_tail = vjp(jnp.ones((), jnp.float32))
    # Tail columns: exp(z - m_tail) * (g_norm exp(m_tail - log_norm) + g_tail / s_tail) / T.
    has_tail = s_tail > 0
    coef = jnp.where(has_tail, g_norm * jnp.exp(jnp.where(has_tail, m_tail - log_norm, 0.0))
                     + g_tail / jnp.where(has_tail, s_tail, 1.0), 0.0) / temperature
    dz_nv = jnp.exp(tail_nv / temperature - shift[:, None]) * coef[:, None]
    at_ids = (g_norm[:, None] * jnp.exp(z_at_ids - log_norm[:, None]) + g_ids) / temperature
    dz_nv = _scatter_rows(dz_nv, drop_nk, jnp.where(valid_nk, at_ids, 0.0), add=False)
    dh_nd = jnp.einsum("nv,dv->nd", dz_nv, head_dv, preferred_element_type=jnp.float32)
    return total, dh_nd.reshape(b, c, -1), (h_nd, dz_nv)


def _add_head_grad(dhead_dv: jax.Array, h_nd: jax.Array, dz_nv: jax.Array, tile: int
                   ) -> jax.Array:
    """dhead + h^T dz, added in vocabulary tiles in place: a whole [D, V] product would be a
    head-sized temporary (1.9 GiB at the 8B head). A loop over whole tiles, then the
    remainder (V mod tile columns) as one static slice."""
    vocab = dz_nv.shape[1]
    tile = max(1, min(int(tile), vocab))

    def add(acc, start, width):
        dz_nt = jax.lax.dynamic_slice_in_dim(dz_nv, start, width, axis=1)
        update = jnp.einsum("nd,nt->dt", h_nd, dz_nt, preferred_element_type=jnp.float32)
        current = jax.lax.dynamic_slice_in_dim(acc, start, width, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(acc, current + update, start, axis=1)

    full = vocab // tile
    acc = jax.lax.fori_loop(0, full, lambda t, acc: add(acc, t * tile, tile), dhead_dv)
    return add(acc, full * tile, vocab - full * tile) if vocab % tile else acc


def _chunking(seq_len: int, chunk_size: int) -> tuple[int, int]:
    """(chunk, pad): the chunk size clamped to 1..L, and the padding to whole chunks."""
    chunk = max(1, min(int(chunk_size), seq_len))
    return chunk, -(-seq_len // chunk) * chunk - seq_len


def _sequence_chunks(arrays: tuple[tuple[jax.Array, object], ...], chunk_size: int
                     ) -> tuple[jax.Array, ...]:
    """((x [B, L, ...], fill), ...) -> each x as [n, B, chunk, ...], the sequence padded with
    its fill to a whole number of chunks."""
    seq_len = arrays[0][0].shape[1]
    chunk, pad = _chunking(seq_len, chunk_size)
    return tuple(_to_chunks(_pad_seq(x, pad, fill), (seq_len + pad) // chunk)
                 for x, fill in arrays)


def _compact(hidden_bld, head_dv, ids_blk, lps_blk, mask_bl, chunk_size: int):
    """Each row's loss positions moved to its front (stable order), padded to whole chunks.

    Returns (xs, order, chunk, needed): xs = (hidden in the matmul dtype, ids, log-probs, mask),
    each [B, Lp, ...]; compacted position j of row b holds position order[b, j]; needed (traced
    int32) = the most loss positions any row has.
    """
    b, seq_len = mask_bl.shape
    chunk, pad = _chunking(seq_len, chunk_size)
    order = jnp.argsort(~mask_bl, axis=1, stable=True)

    def take(x, fill):
        idx = order.reshape(b, seq_len, *([1] * (x.ndim - 2)))
        return _pad_seq(jnp.take_along_axis(x, idx, axis=1), pad, fill)

    h = hidden_bld.astype(jnp.result_type(hidden_bld, head_dv))
    xs = (take(h, 0), take(ids_blk.astype(jnp.int32), 0), take(lps_blk, NEG_INF),
          take(mask_bl, False))
    return xs, order, chunk, jnp.max(jnp.sum(mask_bl, axis=1)).astype(jnp.int32)


def _over_loss_positions(piece, carry, xs, chunk: int, needed):
    """carry after piece(carry, start, slices of xs [B, width, ...] at start) over the first
    `needed` compacted positions: whole chunks, then the rest in pieces of chunk / 2 and
    chunk / 4 (a rest over 3/4 of a chunk takes one more whole chunk). Each width is a loop
    with a traced trip count (0 or 1 for the pieces), so the carry (the head gradient) is
    updated in place, and nothing past the last loss position runs: prompt, padding and (in
    masked_only / prefix_block) visible tokens cost no head FLOPs."""
    subs = sorted({w for w in (chunk // 2, chunk // 4) if w >= 1}, reverse=True)
    n_full, rest = needed // chunk, needed % chunk
    extra = rest > sum(subs)
    n_full, rest = n_full + extra, jnp.where(extra, 0, rest)
    start = jnp.zeros((), jnp.int32)
    for width, trips in [(chunk, n_full)] + [(w, None) for w in subs]:
        if trips is None:  # take this piece if the smaller ones cannot hold the rest
            trips = (rest > sum(v for v in subs if v < width)).astype(jnp.int32)
            rest = jnp.maximum(rest - width * trips, 0)

        def body(i, c, width=width, first=start):
            at = first + i * width
            return piece(c, at, tuple(jax.lax.dynamic_slice_in_dim(x, at, width, axis=1)
                                      for x in xs))

        carry = jax.lax.fori_loop(0, trips, body, carry)
        start = start + width * trips
    return carry


def _fused_sequence_loss_fwd(hidden_bld, head_dv, ids_blk, lps_blk, mask_bl, opts):
    """(loss sum, (d hidden, d head)): one pass over the loss positions, gradients included."""
    kind, temperature, beta, chunk_size, vocab_tile = opts
    xs, order, chunk, needed = _compact(hidden_bld, head_dv, ids_blk, lps_blk, mask_bl,
                                        chunk_size)

    def piece(carry, start, chunk_xs):
        total, dhead, dh_all = carry
        t, dh, (h_nd, dz_nv) = _chunk_loss_and_grads(
            chunk_xs[0], head_dv, *chunk_xs[1:], kind=kind, temperature=temperature, beta=beta,
            with_grads=True)
        return (total + t, _add_head_grad(dhead, h_nd, dz_nv, vocab_tile),
                jax.lax.dynamic_update_slice_in_dim(dh_all, dh.astype(dh_all.dtype), start,
                                                    axis=1))

    init = (jnp.zeros((), jnp.float32), jnp.zeros(head_dv.shape, jnp.float32),
            jnp.zeros(xs[0].shape, xs[0].dtype))
    total, dhead, dh_all = _over_loss_positions(piece, init, xs, chunk, needed)
    seq_len = hidden_bld.shape[1]
    # Back to the original order; positions outside the loss keep a zero gradient.
    dh = jnp.take_along_axis(dh_all[:, :seq_len], jnp.argsort(order, axis=1)[..., None], axis=1)
    return total, (dh.astype(hidden_bld.dtype), dhead.astype(head_dv.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fused_sequence_loss(hidden_bld, head_dv, ids_blk, lps_blk, mask_bl, opts):
    """Sum over masked positions of the divergence, through the head in sequence chunks.

    Each row's loss positions are first gathered to its front, so the chunks run only as far as
    the fullest row's loss positions reach (`_over_loss_positions`). The gradients are made in the forward pass from the chunk
    logits already at hand (custom VJP), so each chunk's logits are computed once: 3 head
    matmuls in all (logits, d hidden, d head) against 4 when autodiff recomputes them under
    remat. opts: (kind, temperature, beta, chunk_size, vocab_tile)."""
    kind, temperature, beta, chunk_size, _ = opts
    xs, _, chunk, needed = _compact(hidden_bld, head_dv, ids_blk, lps_blk, mask_bl, chunk_size)

    def piece(total, start, chunk_xs):
        del start
        return total + _chunk_loss_and_grads(chunk_xs[0], head_dv, *chunk_xs[1:], kind=kind,
                                             temperature=temperature, beta=beta,
                                             with_grads=False)

    return _over_loss_positions(piece, jnp.zeros((), jnp.float32), xs, chunk, needed)


def _fused_sequence_loss_bwd(opts, grads, g):
    dh, dhead = grads
    return (g.astype(dh.dtype) * dh, g.astype(dhead.dtype) * dhead, None, None, None)


_fused_sequence_loss.defvjp(_fused_sequence_loss_fwd, _fused_sequence_loss_bwd)


def distill_loss(hidden_bld: jax.Array, head_dv: jax.Array, teacher_ids_blk: jax.Array,
                 teacher_logprobs_blk: jax.Array, loss_mask_bl: jax.Array, *, kind: str = "kl",
                 temperature: float = 1.0, chunk_size: int = 256, beta: float = 0.5,
                 chunk_axis: str = "sequence", vocab_tile: int = VOCAB_TILE
                 ) -> tuple[jax.Array, jax.Array]:
    """(sum over loss positions of the divergence, number of loss positions), both float32 [].

    hidden_bld [B, L, D] final hidden states (after ln_f, any float dtype); head_dv [D, V];
    teacher_ids_blk / teacher_logprobs_blk [B, L, K]; loss_mask_bl bool [B, L].
    The mean loss is sum / count, with both summed over the global batch first. chunk_axis
    "sequence" cuts the LM head into chunks of `chunk_size` positions (adding the head gradient
    in tiles of `vocab_tile` columns), "vocab" into tiles of `vocab_tile` (module docstring).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}: choose one of {', '.join(KINDS)} "
                         "(config field loss.kind)")

    if chunk_axis == "sequence":
        total = _fused_sequence_loss(hidden_bld, head_dv, teacher_ids_blk, teacher_logprobs_blk,
                                     loss_mask_bl, (kind, float(temperature), float(beta),
                                                    int(chunk_size), int(vocab_tile)))
        return total, jnp.sum(loss_mask_bl).astype(jnp.float32)

    if chunk_axis != "vocab":
        raise ValueError(f"unknown chunk axis {chunk_axis!r}: choose one of {CHUNK_AXES} "
                         "(config field loss.chunk_axis)")
    stats = vocab_tiled_stats(hidden_bld, head_dv, teacher_ids_blk,
                              teacher_logprobs_blk > NEG_INF, temperature=temperature,
                              vocab_tile=vocab_tile, with_top1=False)
    logp, logq = bucket_logprobs_from_stats(stats, teacher_logprobs_blk, temperature)
    per_position = divergence(logp, logq, kind, beta)
    return (jnp.sum(jnp.where(loss_mask_bl, per_position, 0.0)),
            jnp.sum(loss_mask_bl).astype(jnp.float32))


def dense_distill_loss(hidden_bld: jax.Array, head_dv: jax.Array, teacher_ids_blk: jax.Array,
                       teacher_logprobs_blk: jax.Array, loss_mask_bl: jax.Array, *,
                       kind: str = "kl", temperature: float = 1.0, beta: float = 0.5
                       ) -> tuple[jax.Array, jax.Array]:
    """`distill_loss` with the full [B, L, V] logits in memory: the yardstick that the tests and
    bench/loss_memory.py compare the chunked version against (values, gradients, memory)."""
    logits_blv = jnp.einsum("bld,dv->blv", hidden_bld, head_dv,
                            preferred_element_type=jnp.float32)
    logp, logq = bucket_logprobs(logits_blv, teacher_ids_blk, teacher_logprobs_blk, temperature)
    per_position = divergence(logp, logq, kind, beta)
    return (jnp.sum(jnp.where(loss_mask_bl, per_position, 0.0)),
            jnp.sum(loss_mask_bl).astype(jnp.float32))
