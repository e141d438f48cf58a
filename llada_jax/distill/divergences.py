"""Divergences between the teacher and the student over the buckets S ∪ {tail}.

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

The student's side of every loss and metric only needs, per position, its tempered logits at the
teacher's ids, the log-normaliser, the log-mass off the teacher's ids and the argmax
(`StudentStats`): `student_stats` makes them from materialised logits, `chunked_head` through the
LM head without materialising [B, L, V].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

KINDS = ("kl", "reverse_kl", "jsd", "tvd", "alpha", "lk")
# Reverse KL needs log p where q > 0. A teacher bucket with zero mass (the tail of a renormalised
# top-5 record) would make it infinite; such buckets are given this probability instead.
REVERSE_KL_TEACHER_FLOOR = 1e-8
# Stored top-k log-probs are fp32: a renormalised top-5 record sums to 1 only up to ~K ulps, so a
# teacher tail below this is rounding noise and counts as an empty bucket (it matters for
# reverse KL, where an empty teacher bucket is floored rather than taken at ~1e-7).
TEACHER_TAIL_MIN = 1e-6
NEG_INF = -jnp.inf


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x <= 0 (larger x is clamped to 0, giving -inf), stable on both ends."""
    x = jnp.minimum(x, 0.0)
    return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def safe_logsumexp(x: jax.Array) -> jax.Array:
    """logsumexp over the last axis; -inf with a zero (not NaN) gradient for an all -inf slice."""
    empty = jnp.all(x == NEG_INF, axis=-1)
    out = jax.nn.logsumexp(jnp.where(empty[..., None], 0.0, x), axis=-1)
    return jnp.where(empty, NEG_INF, out)


def safe_logaddexp(a: jax.Array, b: jax.Array) -> jax.Array:
    """logaddexp that keeps -inf (and a zero gradient) where both inputs are -inf."""
    both = (a == NEG_INF) & (b == NEG_INF)
    out = jnp.logaddexp(jnp.where(both, 0.0, a), jnp.where(both, 0.0, b))
    return jnp.where(both, NEG_INF, out)


def log_of_sumexp(m: jax.Array, s: jax.Array) -> jax.Array:
    """m + log(s), -inf (with a zero, not NaN, gradient) where s == 0."""
    empty = s == 0.0
    return jnp.where(empty, NEG_INF, jnp.where(empty, 0.0, m) + jnp.log(jnp.where(empty, 1.0, s)))


def scatter_rows(base_nv: jax.Array, ids_nk: jax.Array, values_nk: jax.Array, add: bool = False
                 ) -> jax.Array:
    """base with values set (or added) at each row's ids; ids == V are dropped. A per-row
    scatter (vmap), so rows sharded over devices need no collectives."""
    def one(b_v, i_k, x_k):
        return b_v.at[i_k].add(x_k, mode="drop") if add else b_v.at[i_k].set(x_k, mode="drop")
    return jax.vmap(one)(base_nv, ids_nk, values_nk)


def dropped_ids(ids_nk: jax.Array, valid_nk: jax.Array, vocab: int) -> jax.Array:
    """The teacher ids with unused slots set to V (which `scatter_rows` drops)."""
    return jnp.where(valid_nk, ids_nk.astype(jnp.int32), vocab)


class StudentStats(NamedTuple):
    """The student's tempered logits z = logits / T reduced to what the losses and metrics need.

    float32 except top1; shapes [...] per position, [..., K] per teacher slot.
    """
    z_at_ids: jax.Array   # [..., K] z at the teacher's ids (unused slots: any finite value)
    log_norm: jax.Array   # [...] logsumexp of z over the vocabulary
    log_tail: jax.Array   # [...] logsumexp of z off the teacher's ids; -inf if they cover V
    top1: jax.Array | None  # [...] int32 argmax of z (the greedy token); None if not asked for


def stats_and_tail(logits_nv: jax.Array, ids_nk: jax.Array, valid_nk: jax.Array,
                   temperature: float = 1.0) -> tuple[StudentStats, jax.Array]:
    """(`StudentStats` [N], tail logits [N, V]) of materialised logits [N, V] (any float dtype).

    The tail logits are the logits with the teacher's ids set to -inf (not yet divided by T; /T
    is applied as they are read). Their max and sum of exp give log_tail exactly, not as
    log(1 - sum_S q): that stays accurate when the student puts almost all its mass on S, where
    1 - sum_S q rounds to 0 in fp32 and a KL against a teacher tail would become infinite.
    log_norm = logaddexp(log_tail, logsumexp of the K gathered logits). The sequence cut's
    closed-form gradient reuses the tail buffer (`chunked_head`).
    """
    logits_nv = logits_nv.astype(jnp.float32)
    vocab = logits_nv.shape[-1]
    drop_nk = dropped_ids(ids_nk, valid_nk, vocab)
    z_at_ids = jnp.take_along_axis(logits_nv, jnp.minimum(drop_nk, vocab - 1),
                                   axis=-1) / temperature
    tail_nv = scatter_rows(logits_nv, drop_nk, jnp.full(drop_nk.shape, NEG_INF))
    m_tail = jnp.max(tail_nv, axis=-1) / temperature
    shift = jnp.where(m_tail == NEG_INF, 0.0, m_tail)  # an empty tail: exp(-inf) = 0 everywhere
    s_tail = jnp.sum(jnp.exp(tail_nv / temperature - shift[:, None]), axis=-1)
    log_tail = log_of_sumexp(m_tail, s_tail)
    log_norm = safe_logaddexp(log_tail, safe_logsumexp(jnp.where(valid_nk, z_at_ids, NEG_INF)))
    top1 = jnp.argmax(logits_nv, axis=-1).astype(jnp.int32)  # unused ones are compiled away
    return StudentStats(z_at_ids, log_norm, log_tail, top1), tail_nv


def student_stats(logits_nv: jax.Array, teacher_ids_nk: jax.Array, valid_nk: jax.Array,
                  temperature: float = 1.0) -> StudentStats:
    """`StudentStats` from materialised logits [..., V] (any float dtype); ids, valid [..., K]."""
    lead, k = logits_nv.shape[:-1], teacher_ids_nk.shape[-1]
    stats, _ = stats_and_tail(logits_nv.reshape(-1, logits_nv.shape[-1]),
                              teacher_ids_nk.reshape(-1, k), valid_nk.reshape(-1, k), temperature)
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


def check_kind(kind: str, beta: float = 0.5, lk_decay: float = 1.0) -> None:
    """A clear error for a loss kind (or jsd beta, lk decay) `divergence` cannot compute."""
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}: choose one of {', '.join(KINDS)} "
                         "(config field loss.kind)")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got beta={beta} (config field loss.beta)")
    if kind == "lk" and not lk_decay >= 0.0:
        raise ValueError(f"lk needs a decay >= 0, got {lk_decay} (config field loss.lk_decay)")


def log_acceptance(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """log alpha = log sum_buckets min(p, q) [..., K+1] -> [...], computed in the log domain (a
    logsumexp of the elementwise min), so alpha near 0 keeps a finite, exact log."""
    return safe_logsumexp(jnp.minimum(logp, logq))


def divergence(logp: jax.Array, logq: jax.Array, kind: str = "kl",
               beta: float = 0.5, lk_decay: float = 1.0) -> jax.Array:
    """Divergence of student q from teacher p, both log-probs over buckets [..., K+1] -> [...].

    kind: 'kl' = KL(p || q) (forward, the original loss); 'reverse_kl' = KL(q || p), with empty
    teacher buckets floored at REVERSE_KL_TEACHER_FLOOR; 'jsd' = beta KL(p || m) +
    (1 - beta) KL(q || m), m = beta p + (1 - beta) q, 0 < beta < 1; 'tvd' = 0.5 sum |p - q|
    (= 1 - alpha, the acceptance-rate gap).
    The acceptance losses of "LK Losses: Direct Acceptance Rate Optimization for Speculative
    Decoding" (ICML 2026), with alpha = sum min(p, q) the speculative-sampling acceptance rate:
    'alpha' = -log alpha; 'lk' = w KL(p || q) + (1 - w)(1 - alpha), w = exp(-lk_decay alpha):
    KL leads while alpha is small (its gradient reaches every bucket; min(p, q) only moves the
    buckets where q < p) and hands over to alpha as it grows. w is a schedule, so it carries no
    gradient (stop_gradient), as in the paper's adaptive blend.
    """
    check_kind(kind, beta, lk_decay)
    if kind == "kl":
        return jnp.sum(_plogratio(logp, logq), axis=-1)
    if kind == "reverse_kl":
        floored = jnp.where(logp == NEG_INF, math.log(REVERSE_KL_TEACHER_FLOOR), logp)
        return jnp.sum(_plogratio(logq, floored), axis=-1)
    if kind == "jsd":
        logm = safe_logaddexp(math.log(beta) + logp, math.log1p(-beta) + logq)
        return (beta * jnp.sum(_plogratio(logp, logm), axis=-1)
                + (1.0 - beta) * jnp.sum(_plogratio(logq, logm), axis=-1))
    if kind == "alpha":
        return -log_acceptance(logp, logq)
    if kind == "lk":
        alpha = jnp.exp(log_acceptance(logp, logq))
        w = jax.lax.stop_gradient(jnp.exp(-lk_decay * alpha))
        return w * jnp.sum(_plogratio(logp, logq), axis=-1) + (1.0 - w) * (1.0 - alpha)
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(logp) - jnp.exp(logq)), axis=-1)  # tvd
