"""The LM head in pieces: the student's statistics and the loss without the [B, L, V] logits.

Two cuts (chosen by config field loss.chunk_axis, see `loss.distill_loss`):
- "sequence" (the default config): each row's loss positions are gathered to its front
  (`compact`), then a loop runs over sequence chunks (all rows at once) only as far as the
  fullest row's loss positions reach, the rest in pieces of 1/2 and 1/4 of a chunk
  (`over_positions`): prompt, padding and positions outside the loss cost no head FLOPs. Each
  chunk makes its [B, chunk, V] logits once. The gradient is written in closed form in the same
  pass (a custom VJP), so the head costs 3 matmuls (logits, d hidden, d head) where autodiff
  under remat needs 4, and each logits buffer is read ~7 times in all; the head gradient is
  added tile by tile, so no head-sized temporary exists. At the 8B head (B = 1, L = 4096,
  V = 126464, chunk 256) its temporary memory is 1/21 of a dense loss (bench/loss_memory.py).
  With the batch sharded over devices, each chunk's head gradient is reduced across them, once
  per chunk. The drafter metrics (distill/metrics.py) run through the same chunker.
- "vocab": a `lax.scan` over vocabulary tiles of the head, all positions at once, with running
  logsumexps, gathers and argmax, under `jax.checkpoint` (4 head matmuls). Temporary memory is
  a few [B, L, tile] buffers (1/17 of dense at tile 4096) and the head gradient is reduced across
  devices once, tile by tile: the cut for a large per-chip batch on a TPU slice
  (configs/llada_8b.py).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from llada_jax.distill import divergences as div
from llada_jax.distill.divergences import NEG_INF, StudentStats

# Default head columns per vocabulary tile: temp memory grows with it (about 7 fp32 [B, L, tile]
# buffers), while smaller tiles mean more scan steps; on CPU 4096 was the fastest at the
# benchmark shape (B = 2, L = 512, D = 512, V = 126464) and 2048 was ~35% slower.
VOCAB_TILE = 4096


# -- the sequence chunker (the loss and the drafter metrics) -----------------------------------

def _pad_seq(x: jax.Array, pad: int, value) -> jax.Array:
    widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, widths, constant_values=value)


class Compacted(NamedTuple):
    xs: tuple             # each input [B, Lp, ...]: row b's selected positions first, then fills
    order: jax.Array      # [B, L] int: compacted position j of row b holds position order[b, j]
    chunk: int            # chunk size, clamped to 1..L
    needed: jax.Array     # traced int32 []: the most selected positions any row has


def compact(select_bl: jax.Array, arrays: tuple[tuple[jax.Array, object], ...],
            chunk_size: int) -> Compacted:
    """((x [B, L, ...], fill), ...) with each row's selected positions moved to its front (stable
    order), padded with the fill to a whole number of chunks."""
    b, seq_len = select_bl.shape
    chunk = max(1, min(int(chunk_size), seq_len))
    pad = -(-seq_len // chunk) * chunk - seq_len
    order = jnp.argsort(~select_bl, axis=1, stable=True)

    def take(x, fill):
        idx = order.reshape(b, seq_len, *([1] * (x.ndim - 2)))
        return _pad_seq(jnp.take_along_axis(x, idx, axis=1), pad, fill)

    return Compacted(tuple(take(x, fill) for x, fill in arrays), order, chunk,
                     jnp.max(jnp.sum(select_bl, axis=1)).astype(jnp.int32))


def over_positions(piece: Callable, carry, c: Compacted):
    """carry after piece(carry, start, slices of c.xs [B, width, ...] at start) over the first
    `c.needed` compacted positions: whole chunks, then the rest in pieces of chunk / 2 and
    chunk / 4 (a rest over 3/4 of a chunk takes one more whole chunk). Each width is a loop
    with a traced trip count (0 or 1 for the pieces), so the carry (the head gradient) is
    updated in place, and nothing past the last selected position runs: prompt, padding and (in
    masked_only / prefix_block) visible tokens cost no head FLOPs."""
    chunk = c.chunk
    subs = sorted({w for w in (chunk // 2, chunk // 4) if w >= 1}, reverse=True)
    n_full, rest = c.needed // chunk, c.needed % chunk
    extra = rest > sum(subs)
    n_full, rest = n_full + extra, jnp.where(extra, 0, rest)
    start = jnp.zeros((), jnp.int32)
    for width, trips in [(chunk, n_full)] + [(w, None) for w in subs]:
        if trips is None:  # take this piece if the smaller ones cannot hold the rest
            trips = (rest > sum(v for v in subs if v < width)).astype(jnp.int32)
            rest = jnp.maximum(rest - width * trips, 0)

        def body(i, acc, width=width, first=start):
            at = first + i * width
            return piece(acc, at, tuple(jax.lax.dynamic_slice_in_dim(x, at, width, axis=1)
                                        for x in c.xs))

        carry = jax.lax.fori_loop(0, trips, body, carry)
        start = start + width * trips
    return carry


# -- the sequence cut of the loss, with its closed-form gradient --------------------------------

class LossOpts(NamedTuple):
    """The static settings of `sequence_loss` (hashable: a custom-VJP nondiff argument)."""
    kind: str
    temperature: float
    beta: float
    lk_decay: float
    chunk_size: int
    vocab_tile: int
    n_offsets: int = 0     # length of the per-offset acceptance sums (0: none)


def offset_sums(values_n: jax.Array, offsets_n: jax.Array, n_offsets: int) -> jax.Array:
    """float32 [n_offsets]: the sum of values at each offset 0..n_offsets-1 (others dropped).

    Offset -1 (no offset) is moved out of range first: scatter wraps negative indices, even
    with mode="drop", and would add it to the last offset."""
    offsets_n = jnp.where(offsets_n >= 0, offsets_n, n_offsets)
    return jnp.zeros((n_offsets,), jnp.float32).at[offsets_n].add(values_n, mode="drop")


def _chunk_loss_and_grads(h_bcd: jax.Array, head_dv: jax.Array, ids_bck: jax.Array,
                          lps_bck: jax.Array, mask_bc: jax.Array, weight_bc: jax.Array,
                          offset_bc: jax.Array, bias_v: jax.Array | None, *, opts: LossOpts,
                          with_grads: bool):
    """(weighted loss sum, acceptance sums by offset [n_offsets]) of one sequence chunk; with
    with_grads also d hidden [B, C, D] and (hidden [B*C, D], d loss / d logits [B*C, V]), the
    last pair for `_add_head_grad`.

    The chunk's logits [B*C, V] (plus bias_v, -inf off the vocabulary the loss is restricted
    to) are made once and serve both the statistics (`divergences.stats_and_tail`) and the
    gradient. The gradient of any divergence goes through the three statistics: jax.vjp of the
    per-position loss w.r.t. (z at the teacher's ids, log_norm, log_tail) gives g_ids, g_norm,
    g_tail, and since d log_norm / d z = softmax(z), d log_tail / d z = softmax over the tail:
      d loss / d z = exp(z - log_norm) g_norm + [v not in S] exp(z - log_tail) g_tail + g_ids,
    made from the same tail buffer, so the [B*C, V] array is passed over ~7 times in all
    (matmul, max, sum, gradient, two matmuls), which matters where memory bandwidth is the limit.
    A new divergence in `divergences.divergence` needs nothing here.
    """
    b, c, _ = h_bcd.shape
    vocab, k = head_dv.shape[1], ids_bck.shape[-1]
    rows, temperature = b * c, opts.temperature
    h_nd = h_bcd.reshape(rows, -1)
    logits_nv = jnp.einsum("nd,dv->nv", h_nd, head_dv, preferred_element_type=jnp.float32)
    if bias_v is not None:
        logits_nv = logits_nv + bias_v[None, :]
    valid_nk = (lps_bck > NEG_INF).reshape(rows, k)
    stats, tail_nv = div.stats_and_tail(logits_nv, ids_bck.reshape(rows, k), valid_nk,
                                        temperature)
    lps_nk = lps_bck.reshape(rows, k)
    mask_n, weight_n = mask_bc.reshape(rows), weight_bc.reshape(rows)

    def chunk_loss(z_at_ids, log_norm, log_tail):
        logp, logq = div.bucket_logprobs_from_stats(
            StudentStats(z_at_ids, log_norm, log_tail, None), lps_nk, temperature)
        d = div.divergence(logp, logq, opts.kind, opts.beta, opts.lk_decay)
        alpha = jnp.where(mask_n, jnp.exp(div.log_acceptance(logp, logq)), 0.0)
        return (jnp.sum(jnp.where(mask_n, weight_n * d, 0.0)),
                jax.lax.stop_gradient(offset_sums(alpha, offset_bc.reshape(rows),
                                                  opts.n_offsets)))

    if not with_grads:
        return chunk_loss(stats.z_at_ids, stats.log_norm, stats.log_tail)
    (total, alpha_g), vjp = jax.vjp(chunk_loss, stats.z_at_ids, stats.log_norm, stats.log_tail)
    g_ids, g_norm, g_tail = vjp((jnp.ones((), jnp.float32), jnp.zeros_like(alpha_g)))
    # Tail columns: exp(z - log_tail) * (g_norm exp(log_tail - log_norm) + g_tail) / T.
    has_tail = stats.log_tail > NEG_INF
    log_tail = jnp.where(has_tail, stats.log_tail, 0.0)  # an empty tail: exp(-inf) = 0 anyway
    coef = jnp.where(has_tail, g_norm * jnp.exp(log_tail - stats.log_norm) + g_tail,
                     0.0) / temperature
    dz_nv = jnp.exp(tail_nv / temperature - log_tail[:, None]) * coef[:, None]
    at_ids = (g_norm[:, None] * jnp.exp(stats.z_at_ids - stats.log_norm[:, None])
              + g_ids) / temperature
    dz_nv = div.scatter_rows(dz_nv, div.dropped_ids(ids_bck.reshape(rows, k), valid_nk, vocab),
                             jnp.where(valid_nk, at_ids, 0.0))
    dh_nd = jnp.einsum("nv,dv->nd", dz_nv, head_dv, preferred_element_type=jnp.float32)
    return (total, alpha_g), dh_nd.reshape(b, c, -1), (h_nd, dz_nv)


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


def _compact_loss_inputs(hidden_bld, head_dv, ids_blk, lps_blk, mask_bl, weight_bl, offset_bl,
                         chunk_size: int) -> Compacted:
    """The loss's inputs with each row's loss positions first; hidden in the matmul dtype."""
    h = hidden_bld.astype(jnp.result_type(hidden_bld, head_dv))
    return compact(mask_bl, ((h, 0), (ids_blk.astype(jnp.int32), 0), (lps_blk, NEG_INF),
                             (mask_bl, False), (weight_bl.astype(jnp.float32), 0.0),
                             (offset_bl.astype(jnp.int32), -1)), chunk_size)


def _sequence_loss_fwd(hidden_bld, head_dv, ids_blk, lps_blk, mask_bl, weight_bl, offset_bl,
                       bias_v, opts: LossOpts):
    """((loss sum, acceptance by offset), (d hidden, d head)): one pass over the loss
    positions, gradients included."""
    c = _compact_loss_inputs(hidden_bld, head_dv, ids_blk, lps_blk, mask_bl, weight_bl,
                             offset_bl, opts.chunk_size)

    def piece(carry, start, chunk_xs):
        total, alpha_g, dhead, dh_all = carry
        (t, a), dh, (h_nd, dz_nv) = _chunk_loss_and_grads(
            chunk_xs[0], head_dv, *chunk_xs[1:], bias_v, opts=opts, with_grads=True)
        return (total + t, alpha_g + a, _add_head_grad(dhead, h_nd, dz_nv, opts.vocab_tile),
                jax.lax.dynamic_update_slice_in_dim(dh_all, dh.astype(dh_all.dtype), start,
                                                    axis=1))

    init = (jnp.zeros((), jnp.float32), jnp.zeros((opts.n_offsets,), jnp.float32),
            jnp.zeros(head_dv.shape, jnp.float32), jnp.zeros(c.xs[0].shape, c.xs[0].dtype))
    total, alpha_g, dhead, dh_all = over_positions(piece, init, c)
    seq_len = hidden_bld.shape[1]
    # Back to the original order; positions outside the loss keep a zero gradient.
    dh = jnp.take_along_axis(dh_all[:, :seq_len], jnp.argsort(c.order, axis=1)[..., None], axis=1)
    return (total, alpha_g), (dh.astype(hidden_bld.dtype), dhead.astype(head_dv.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def sequence_loss(hidden_bld, head_dv, ids_blk, lps_blk, mask_bl, weight_bl, offset_bl, bias_v,
                  opts: LossOpts):
    """(sum over masked positions of weight * divergence, the student's acceptance alpha summed
    by drafted offset [opts.n_offsets], no gradient), through the head in sequence chunks.

    weight_bl float [B, L] (no gradient), offset_bl int [B, L] (-1: no offset), bias_v [V] or
    None: added to the logits (-inf restricts the student to a sub-vocabulary).
    Each row's loss positions are first gathered to its front, so the chunks run only as far as
    the fullest row's loss positions reach (`over_positions`). The gradients are made in the
    forward pass from the chunk logits already at hand (custom VJP), so each chunk's logits are
    computed once: 3 head matmuls in all (logits, d hidden, d head) against 4 when autodiff
    recomputes them under remat."""
    c = _compact_loss_inputs(hidden_bld, head_dv, ids_blk, lps_blk, mask_bl, weight_bl,
                             offset_bl, opts.chunk_size)

    def piece(carry, start, chunk_xs):
        del start
        t, a = _chunk_loss_and_grads(chunk_xs[0], head_dv, *chunk_xs[1:], bias_v, opts=opts,
                                     with_grads=False)
        return carry[0] + t, carry[1] + a

    return over_positions(piece, (jnp.zeros((), jnp.float32),
                                  jnp.zeros((opts.n_offsets,), jnp.float32)), c)


def _sequence_loss_bwd(opts, grads, g):
    dh, dhead = grads
    g_total = g[0]  # the acceptance sums carry no gradient
    return (g_total.astype(dh.dtype) * dh, g_total.astype(dhead.dtype) * dhead,
            None, None, None, None, None, None)


sequence_loss.defvjp(_sequence_loss_fwd, _sequence_loss_bwd)


# -- the vocabulary cut ---------------------------------------------------------------------------

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


class _TileCarry(NamedTuple):
    """Running per-position statistics over the vocabulary tiles seen so far; [N] or [N, K]."""
    z_at_ids: jax.Array   # [N, K] z at the teacher ids seen so far, 0 elsewhere
    norm: tuple           # (max, sum) of exp over all columns; the max is also top1's value
    tail: tuple           # (max, sum) of exp over columns that are not teacher ids
    top1: jax.Array | None  # [N] int32 argmax so far (None: not asked for)


def vocab_tiled_stats(hidden_bld: jax.Array, head_dv: jax.Array, teacher_ids_blk: jax.Array,
                      valid_blk: jax.Array, *, temperature: float = 1.0,
                      vocab_tile: int = VOCAB_TILE, with_top1: bool = True,
                      bias_v: jax.Array | None = None) -> StudentStats:
    """`StudentStats` [B, L] of logits = hidden @ head, scanning the head in vocabulary tiles.

    hidden_bld [B, L, D]; head_dv [D, V]; teacher_ids_blk, valid_blk [B, L, K].
    Each tile's logits [B, L, tile] exist only inside a checkpointed scan body. The tile is cut
    from the head with a dynamic slice (not passed as scan inputs, which would copy the head), so
    the head gradient is written into its output slice by slice. When the tile does not divide V,
    the last tile is moved back to end at V and masks the columns its predecessor covered.
    with_top1=False leaves `top1` None: an argmax costs XLA:CPU about half a tile's matmul.
    bias_v [V] (or None) is added to the logits, as in `sequence_loss`.
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
        z_blt = jnp.einsum("bld,dt->blt", h_bld, head_dt, preferred_element_type=jnp.float32)
        if bias_v is not None:
            z_blt = z_blt + jax.lax.dynamic_slice_in_dim(bias_v, start, tile)
        z_blt = z_blt / temperature
        z_nt = jnp.where(start + jnp.arange(tile) >= begin, z_blt, NEG_INF).reshape(rows, tile)
        local_nk = (ids_blk - start).reshape(rows, k)
        here_nk = (valid_blk & (ids_blk >= begin) & (ids_blk < start + tile)).reshape(rows, k)
        z_at_ids = jnp.where(here_nk, jnp.take_along_axis(
            z_nt, jnp.clip(local_nk, 0, tile - 1), axis=-1), 0.0)
        top1 = start + jnp.argmax(z_nt, axis=-1).astype(jnp.int32) if with_top1 else None
        tail_nt = div.scatter_rows(z_nt, div.dropped_ids(local_nk, here_nk, tile),
                                   jnp.full(local_nk.shape, NEG_INF))
        return _TileCarry(z_at_ids, _max_sumexp(z_nt), _max_sumexp(tail_nt), top1)

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
    return StudentStats(acc.z_at_ids.reshape(*lead, k),
                        div.log_of_sumexp(*acc.norm).reshape(lead),
                        div.log_of_sumexp(*acc.tail).reshape(lead),
                        None if acc.top1 is None else acc.top1.reshape(lead))
