"""Speculative-decoding quality of the drafter against the teacher's stored top-k.

Per scored position (DESIGN.md, "Speculative-decoding metrics"), with p the teacher and q the
student over the buckets S ∪ {tail} of `divergences.bucket_logprobs`:
- alpha_lower = sum_{i in S} min(p_i, q_i): acceptance probability counted on S only;
- alpha_upper = alpha_lower + min(p_tail, q_tail): the best the unknown tail could add
  (= 1 - TVD over the buckets);
- top1: student argmax over the full vocabulary == the teacher's top-1 id;
- kl: KL(p || q), the training loss at T = 1.
Sums are taken per offset within the drafted block (see `masking.drafting_batch`) through the
same sequence chunker as the loss (`chunked_head`: only the scored positions pass through the
LM head), and returned as (sum, count) so hosts can add them. `evaluate_model` runs them over
held-out batches: the function `train`'s periodic eval and `llada-jax eval` share.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada_jax.distill import chunked_head
from llada_jax.distill import divergences as div
from llada_jax.distill import masking

METRICS = ("kl", "alpha_lower", "alpha_upper", "top1")


def position_metrics(logits_bcv: jax.Array, teacher_ids_bck: jax.Array,
                     teacher_logprobs_bck: jax.Array, temperature: float = 1.0
                     ) -> dict[str, jax.Array]:
    """{metric: float32 [B, C]} for every position (callers pick the scored ones)."""
    stats = div.student_stats(logits_bcv, teacher_ids_bck, teacher_logprobs_bck > div.NEG_INF,
                              temperature)
    logp, logq = div.bucket_logprobs_from_stats(stats, teacher_logprobs_bck, temperature)
    overlap = jnp.minimum(jnp.exp(logp), jnp.exp(logq))
    alpha_lower = jnp.sum(overlap[..., :-1], axis=-1)
    top1 = stats.top1 == teacher_ids_bck[..., 0]
    return {"kl": div.divergence(logp, logq, "kl"), "alpha_lower": alpha_lower,
            "alpha_upper": alpha_lower + overlap[..., -1], "top1": top1.astype(jnp.float32)}


def bin_sums(values: dict[str, jax.Array], bin_bc: jax.Array, n_bins: int
             ) -> dict[str, jax.Array]:
    """{name: [B, C] per position} -> {name: [n_bins] sum, 'count': [n_bins]}; bin -1 = skip."""
    onehot_bcn = (bin_bc[..., None] == jnp.arange(n_bins)).astype(jnp.float32)
    counted = bin_bc >= 0
    sums = {name: jnp.einsum("bc,bcn->n", jnp.where(counted, v.astype(jnp.float32), 0.0),
                             onehot_bcn) for name, v in values.items()}
    sums["count"] = jnp.sum(onehot_bcn, axis=(0, 1))
    return sums


def drafter_metric_sums(hidden_bld: jax.Array, head_dv: jax.Array, teacher_ids_blk: jax.Array,
                        teacher_logprobs_blk: jax.Array, offset_bl: jax.Array, *, gamma: int,
                        temperature: float = 1.0, chunk_size: int = 256
                        ) -> dict[str, jax.Array]:
    """Per-offset sums: {metric: float32 [gamma]} and 'count': float32 [gamma].

    offset_bl int [B, L]: the position's offset in its drafted block, -1 (or >= gamma) = not
    scored. hidden_bld [B, L, D], head_dv [D, V], teacher arrays [B, L, K]. Each row's scored
    positions are gathered to its front and only they pass through the head, in sequence chunks
    of `chunk_size` (all rows at once, so a batch axis sharded over devices stays sharded).
    """
    bins = jnp.where((offset_bl >= 0) & (offset_bl < gamma), offset_bl, -1).astype(jnp.int32)
    c = chunked_head.compact(bins >= 0, ((hidden_bld, 0), (teacher_ids_blk, 0),
                                         (teacher_logprobs_blk, div.NEG_INF), (bins, -1)),
                             chunk_size)

    def piece(sums, start, chunk_xs):
        del start
        h_bcd, ids_bck, lps_bck, bins_bc = chunk_xs
        logits_bcv = jnp.einsum("bcd,dv->bcv", h_bcd, head_dv, preferred_element_type=jnp.float32)
        new = bin_sums(position_metrics(logits_bcv, ids_bck, lps_bck, temperature), bins_bc, gamma)
        return jax.tree.map(jnp.add, sums, new)

    init = {name: jnp.zeros((gamma,), jnp.float32) for name in METRICS + ("count",)}
    return chunked_head.over_positions(piece, init, c)


def expected_tokens_per_call(alpha, gamma: int):
    """E(gamma) = (1 - alpha^(gamma+1)) / (1 - alpha) tokens per target call, written as
    sum_{j=0..gamma} alpha^j: exact at alpha = 1 (gamma + 1) and free of cancellation near it.
    Works on floats, NumPy and JAX arrays."""
    return sum(alpha ** j for j in range(gamma + 1))


def summarize(sums: dict, gammas: tuple[int, ...]) -> dict:
    """JSON-ready means from (possibly host-summed) `drafter_metric_sums`.

    Returns {'by_offset': {metric: [mean per offset]}, 'count_by_offset': [...], and per gamma
    in `gammas` (each <= the gamma the sums were taken with): {'gamma=G': {metric: mean over
    offsets < G, 'E_lower' / 'E_upper': E(G) at alpha_lower / alpha_upper}}}. A bin with no
    scored position gives None.
    """
    sums = {name: [float(x) for x in jax.device_get(v)] for name, v in sums.items()}
    counts = sums["count"]

    def mean(name, upto):
        total = sum(counts[:upto])
        return sum(sums[name][:upto]) / total if total else None

    out = {"by_offset": {m: [sums[m][j] / counts[j] if counts[j] else None
                             for j in range(len(counts))] for m in METRICS},
           "count_by_offset": counts}
    for g in gammas:
        if g > len(counts):
            raise ValueError(f"gamma {g} is larger than the {len(counts)} offsets the metric "
                             "sums were taken with: pass gamma=max(gammas) to drafter_metric_sums")
        block = {m: mean(m, g) for m in METRICS}
        for bound in ("lower", "upper"):
            alpha = block[f"alpha_{bound}"]
            block[f"E_{bound}"] = None if alpha is None else expected_tokens_per_call(alpha, g)
        out[f"gamma={g}"] = block
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "gamma", "mask_token_id", "chunk_size"))
def _metric_sums(graphdef, params, batch, seed, *, gamma: int, mask_token_id: int,
                 chunk_size: int):
    model = nnx.merge(graphdef, params)
    noisy, offset = masking.drafting_batch(batch, jax.random.key(seed), gamma,
                                           mask_token_id=mask_token_id)
    hidden = model(noisy, positions_bl=batch["positions"], segment_ids_bl=batch["segment_ids"],
                   return_hidden=True)
    return drafter_metric_sums(hidden, model.lm_head_weight(), batch["teacher_ids"],
                                       batch["teacher_logprobs"], offset, gamma=gamma,
                                       chunk_size=chunk_size)


def evaluate_model(model, batches, eval_config, *, max_batches: int | None = None) -> dict:
    """Metric means of `model` over `batches` (an iterable of batch dicts, global arrays or
    NumPy): `summarize` output plus 'overall' (offsets < max(gammas)) and the number of
    scored positions; {} when there is no batch. eval_config: the config's `eval` section
    (gammas, seed of the cut points, chunk_size)."""
    graphdef, params = nnx.split(model)
    gammas = tuple(eval_config.gammas)
    gamma = max(gammas)
    totals = None
    for i, batch in enumerate(itertools.islice(batches, max_batches)):
        sums = _metric_sums(graphdef, params, batch, eval_config.seed + i, gamma=gamma,
                            mask_token_id=model.cfg.mask_token_id,
                            chunk_size=eval_config.chunk_size)
        sums = jax.device_get(sums)
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    if totals is None:
        return {}
    out = summarize(totals, gammas)
    out["overall"] = {k: v for k, v in out[f"gamma={gamma}"].items() if v is not None}
    out["scored_positions"] = float(np.sum(totals["count"]))
    return out
