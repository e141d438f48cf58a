"""The distillation loss: the divergence over target positions, through the LM head in pieces.

Divergences over the buckets S ∪ {tail} are in `divergences`; the cuts of the LM head that keep
the [B, L, V] logits out of memory (sequence chunks with a closed-form gradient, vocabulary
tiles) in `chunked_head`. Results are (sum, count) pairs so they add up across microbatches and
hosts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llada_jax.train import chunked_head
from llada_jax.train import divergences as div

CHUNK_AXES = ("sequence", "vocab")


def distill_loss(hidden_bld: jax.Array, head_dv: jax.Array, teacher_ids_blk: jax.Array,
                 teacher_logprobs_blk: jax.Array, loss_mask_bl: jax.Array, *, kind: str = "kl",
                 temperature: float = 1.0, chunk_size: int = 256, beta: float = 0.5,
                 chunk_axis: str = "sequence", vocab_tile: int = chunked_head.VOCAB_TILE
                 ) -> tuple[jax.Array, jax.Array]:
    """(sum over loss positions of the divergence, number of loss positions), both float32 [].

    hidden_bld [B, L, D] final hidden states (after ln_f, any float dtype); head_dv [D, V];
    teacher_ids_blk / teacher_logprobs_blk [B, L, K]; loss_mask_bl bool [B, L].
    The mean loss is sum / count, with both summed over the global batch first. chunk_axis
    "sequence" cuts the LM head into chunks of `chunk_size` positions (adding the head gradient
    in tiles of `vocab_tile` columns), "vocab" into tiles of `vocab_tile` (`chunked_head`).
    """
    div.check_kind(kind, beta)
    count = jnp.sum(loss_mask_bl).astype(jnp.float32)
    if chunk_axis == "sequence":
        total = chunked_head.sequence_loss(
            hidden_bld, head_dv, teacher_ids_blk, teacher_logprobs_blk, loss_mask_bl,
            (kind, float(temperature), float(beta), int(chunk_size), int(vocab_tile)))
        return total, count
    if chunk_axis != "vocab":
        raise ValueError(f"unknown chunk axis {chunk_axis!r}: choose one of "
                         f"{', '.join(CHUNK_AXES)} (config field loss.chunk_axis)")
    stats = chunked_head.vocab_tiled_stats(
        hidden_bld, head_dv, teacher_ids_blk, teacher_logprobs_blk > div.NEG_INF,
        temperature=temperature, vocab_tile=vocab_tile, with_top1=False)
    logp, logq = div.bucket_logprobs_from_stats(stats, teacher_logprobs_blk, temperature)
    per_position = div.divergence(logp, logq, kind, beta)
    return jnp.sum(jnp.where(loss_mask_bl, per_position, 0.0)), count


def dense_distill_loss(hidden_bld: jax.Array, head_dv: jax.Array, teacher_ids_blk: jax.Array,
                       teacher_logprobs_blk: jax.Array, loss_mask_bl: jax.Array, *,
                       kind: str = "kl", temperature: float = 1.0, beta: float = 0.5
                       ) -> tuple[jax.Array, jax.Array]:
    """`distill_loss` with the full [B, L, V] logits in memory: the yardstick that the tests and
    bench/loss_memory.py compare the chunked version against (values, gradients, memory)."""
    logits_blv = jnp.einsum("bld,dv->blv", hidden_bld, head_dv,
                            preferred_element_type=jnp.float32)
    logp, logq = div.bucket_logprobs(logits_blv, teacher_ids_blk, teacher_logprobs_blk,
                                     temperature)
    per_position = div.divergence(logp, logq, kind, beta)
    return (jnp.sum(jnp.where(loss_mask_bl, per_position, 0.0)),
            jnp.sum(loss_mask_bl).astype(jnp.float32))
