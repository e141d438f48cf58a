"""Diffusion forward process: which response tokens are replaced by the mask token, and which
positions the loss counts. Also the drafting condition used by the speculative-decoding metrics.

Every decision is made per packed segment (segment_ids 1..n within a row; 0 = padding): each
segment gets its own noise level t or its own cut point, as if it were its own example. The
prompt and padding are never masked and never counted. All functions are jittable (the mode is
static) and deterministic given the PRNG key.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from data_pipeline.batch import Batch

DIFFUSION_MODES = ("original", "masked_only", "full", "prefix_block")  # `diffusion_mask`
MODES = DIFFUSION_MODES + ("draft_blocks",)  # config field loss.mask_mode; the last: `draft_blocks`


def response_mask(batch: Batch) -> jax.Array:
    """bool [B, L]: tokens of a real segment that are not prompt."""
    return (batch["segment_ids"] > 0) & ~batch["prompt_mask"]


def _per_segment_uniform(rng: jax.Array, segment_ids_bl: jax.Array) -> jax.Array:
    """float32 [B, L]: one U[0, 1) draw per (row, segment id), broadcast to the segment's tokens.

    Segment ids are at most L (each segment holds a token), so L + 1 draws per row cover them.
    """
    b, seq = segment_ids_bl.shape
    u_bs = jax.random.uniform(rng, (b, seq + 1))
    return jnp.take_along_axis(u_bs, segment_ids_bl, axis=1)


def _response_index_and_length(segment_ids_bl: jax.Array, response_bl: jax.Array
                               ) -> tuple[jax.Array, jax.Array]:
    """(index of each position among its segment's response tokens, that segment's response
    length), both int32 [B, L]. Assumes packed segments are contiguous, as the loader packs them."""
    b, seq = segment_ids_bl.shape
    flat_ids = (segment_ids_bl + (seq + 1) * jnp.arange(b)[:, None]).reshape(-1)
    n_segments = b * (seq + 1)
    resp = response_bl.astype(jnp.int32)
    before = jnp.cumsum(resp, axis=1) - resp  # response tokens earlier in the row
    first = jax.ops.segment_min(before.reshape(-1), flat_ids, num_segments=n_segments)
    length = jax.ops.segment_sum(resp.reshape(-1), flat_ids, num_segments=n_segments)
    return (before - first[flat_ids].reshape(b, seq), length[flat_ids].reshape(b, seq))


def diffusion_mask(rng: jax.Array, batch: Batch, *, mask_token_id: int, mode: str = "original",
                   eps: float = 1e-3) -> tuple[jax.Array, jax.Array]:
    """Returns (noisy_tokens_bl int32 [B, L], loss_mask_bl bool [B, L]).

    mode 'original' (the original trainer): t ~ U(0, 1) per segment, p = (1 - eps) t + eps, each
      response token masked with probability p; loss on every response position with a target.
    'masked_only': the same masking; loss only on the masked positions with a target.
    'full': the whole response masked; loss on every response position with a target.
    'prefix_block': a visible response prefix of length ~ U{0, .., n - 1} per segment (n = its
      response length), the rest masked (how a drafter is used); loss on masked positions.
    """
    if mode == "draft_blocks":
        raise ValueError("mask mode draft_blocks changes the attention segments: use "
                         "`draft_blocks` (train_step does)")
    if mode not in DIFFUSION_MODES:
        raise ValueError(f"unknown mask mode {mode!r}: choose one of {', '.join(MODES)} "
                         "(config field loss.mask_mode)")
    response = response_mask(batch)
    segment_ids = batch["segment_ids"]
    rng_segment, rng_token = jax.random.split(rng)
    if mode in ("original", "masked_only"):
        p_bl = (1.0 - eps) * _per_segment_uniform(rng_segment, segment_ids) + eps
        masked = response & (jax.random.uniform(rng_token, response.shape) < p_bl)
    elif mode == "full":
        masked = response
    else:
        index, length = _response_index_and_length(segment_ids, response)
        masked = response & (index >= _cut_points(rng_segment, segment_ids, length))
    counted = masked if mode in ("masked_only", "prefix_block") else response
    noisy = jnp.where(masked, jnp.int32(mask_token_id), batch["tokens"].astype(jnp.int32))
    return noisy, counted & batch["target_mask"]


def _is_prng_key(x) -> bool:
    x = jnp.asarray(x)
    return (jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
            or (x.dtype == jnp.uint32 and x.shape == (2,)))


def _cut_points(rng_or_cuts, segment_ids_bl: jax.Array, length_bl: jax.Array) -> jax.Array:
    """int32 [B, L]: each position's segment cut, as an index into the segment's response."""
    if isinstance(rng_or_cuts, int):
        rng_or_cuts = jax.random.key(rng_or_cuts)
    if _is_prng_key(rng_or_cuts):
        u_bl = _per_segment_uniform(rng_or_cuts, segment_ids_bl)
        return jnp.floor(u_bl * length_bl).astype(jnp.int32)
    cuts_bs = jnp.asarray(rng_or_cuts, jnp.int32)
    b, seq = segment_ids_bl.shape
    if cuts_bs.ndim != 2 or cuts_bs.shape[0] != b or cuts_bs.shape[1] > seq:
        raise ValueError(f"drafting cut points must be an int array [B={b}, S<={seq}] (column "
                         f"s-1 = cut of segment id s), a PRNG key or an int seed; got shape "
                         f"{cuts_bs.shape}")
    # Column 0 is padding; segment ids past the given columns get a cut past their response.
    table = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), cuts_bs,
                             jnp.full((b, seq - cuts_bs.shape[1]), seq, jnp.int32)], axis=1)
    return jnp.maximum(jnp.take_along_axis(table, segment_ids_bl, axis=1), 0)


def drafting_batch(batch: Batch, rng_or_cuts, gamma: int, *, mask_token_id: int
                   ) -> tuple[jax.Array, jax.Array]:
    """The drafting condition: returns (noisy_tokens_bl int32 [B, L], offset_bl int32 [B, L]).

    For each segment a cut c in its response (uniform over 0..n-1 from a PRNG key or int seed,
    or given as cuts [B, S], column s-1 for segment id s): prompt + response[:c] stay visible,
    response[c:] is masked. offset = j - c on response position j for c <= j < c + gamma where
    the position has a target (these are scored, binned by offset); -1 everywhere else.
    """
    response = response_mask(batch)
    segment_ids = batch["segment_ids"]
    index, length = _response_index_and_length(segment_ids, response)
    offset = index - _cut_points(rng_or_cuts, segment_ids, length)
    masked = response & (offset >= 0)
    scored = masked & (offset < gamma) & batch["target_mask"]
    noisy = jnp.where(masked, jnp.int32(mask_token_id), batch["tokens"].astype(jnp.int32))
    return noisy, jnp.where(scored, offset, -1).astype(jnp.int32)


class DraftBlocks(NamedTuple):
    """One training row laid out the way `speculate` drafts (see `draft_blocks`)."""
    noisy: jax.Array        # int32 [B, L] tokens with the block and its trailing run masked
    loss_mask: jax.Array    # bool [B, L] the scored positions that have a target
    offset: jax.Array       # int32 [B, L] offset within the block (0..gamma-1), -1 elsewhere
    segment_ids: jax.Array  # int32 [B, L] the batch's, 0 (hidden padding) after the trailing run


def draft_blocks(rng: jax.Array, batch: Batch, *, mask_token_id: int, gamma: int,
                 gamma_max: int = 0, trailing: int = 4, score_prefix: bool = False,
                 score_trailing: bool = False, original_fraction: float = 0.0,
                 eps: float = 1e-3) -> DraftBlocks:
    """Each packed segment becomes one drafting step of `speculate`: the prompt and a verified
    response prefix of length c ~ U{0, .., n - 1} are visible, the next gamma positions (gamma
    per segment ~ U{gamma, .., gamma_max} when gamma_max > gamma) are masked and scored, then
    `trailing` more masks (speculate's --trailing-masks run), and the rest of the response is
    hidden from attention (segment id 0, as padding) because at drafting time it does not exist
    yet. That is `Drafter.draft`'s input exactly: context, gamma + trailing masks, nothing after
    (positions restart per segment as the drafter's arange does).

    Several blocks per row: the loader packs several examples into a row and each segment gets
    its own cut and block. Within one segment a second block would need a second prefix: its
    positions would see the first block's masks (or the tokens the first one hides), so it
    would not be a drafting condition; drawing one block per segment per step and packing rows
    keeps every block exact.

    One block scores only gamma positions of a segment where the original masking scores all
    of its response, so at a fixed step budget the student sees far less signal. What makes up
    for it without leaving the drafting condition (offsets, and so the position weights, stay
    those of the block; the extra positions weigh 1):
    - score_prefix: the visible prefix's positions with a target are scored too, as the
      original counts its visible positions (the teacher's distribution of a token seen in
      context);
    - score_trailing: the trailing masks are scored too (the same prediction further ahead);
    - original_fraction: that fraction of the segments (drawn per segment) keeps the original
      masking instead (`diffusion_mask` 'original', every response position scored, nothing
      hidden).
    """
    response = response_mask(batch)
    segment_ids = batch["segment_ids"]
    index, length = _response_index_and_length(segment_ids, response)
    rng_cut, rng_gamma, rng_mix, rng_original = jax.random.split(rng, 4)
    offset = index - _cut_points(rng_cut, segment_ids, length)
    gamma_bl = jnp.full(offset.shape, gamma, jnp.int32)
    if gamma_max > gamma:
        u = _per_segment_uniform(rng_gamma, segment_ids)
        gamma_bl = gamma + jnp.floor(u * (gamma_max - gamma + 1)).astype(jnp.int32)
    masked = response & (offset >= 0) & (offset < gamma_bl + trailing)
    block = masked & (offset < gamma_bl) & batch["target_mask"]
    scored = (masked & batch["target_mask"]) if score_trailing else block
    if score_prefix:
        scored = scored | (response & (offset < 0) & batch["target_mask"])
    hidden = response & (offset >= gamma_bl + trailing)
    noisy = jnp.where(masked, jnp.int32(mask_token_id), batch["tokens"].astype(jnp.int32))
    offset = jnp.where(block, offset, -1).astype(jnp.int32)
    segs = jnp.where(hidden, 0, segment_ids).astype(jnp.int32)
    if original_fraction > 0:
        original = _per_segment_uniform(rng_mix, segment_ids) < original_fraction
        noisy_o, scored_o = diffusion_mask(rng_original, batch, mask_token_id=mask_token_id,
                                           mode="original", eps=eps)
        noisy, scored = jnp.where(original, noisy_o, noisy), jnp.where(original, scored_o, scored)
        offset = jnp.where(original, -1, offset)
        segs = jnp.where(original, segment_ids, segs).astype(jnp.int32)
    return DraftBlocks(noisy, scored, offset, segs)
