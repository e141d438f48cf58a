"""The device side of a speculative block: draft, bridge, verify, accept (pure jax functions).

    ids, q = draft(logits_fn, tokens, cols, ...)      # γ drafted student ids (+ their laws)
    out = accept(logits, draft_t, valid, ...)         # the emitted teacher ids per row

Everything here runs inside the engine's one jitted block step (engine.py); nothing comes back
to the host but the ≤ γ+1 new ids per row and two counts. The vocabulary bridge is two small
tables: `to_teacher` int32 [V_student] (the teacher id of the same bytes) and `allowed` bool
[V_student] (what the drafter may propose); no [V, V] array exists, and greedy needs no q.

Sampled verification is the usual speculative sampling (Leviathan et al. 2023): x_j ~ q_j is
accepted with probability min(1, p_j(x_j) / q_j(x_j)); the first rejection draws from
norm(max(0, p_j - q_j)); after the last valid draft position the token is drawn from p (the
bonus). A position whose q is not the token's law given the accepted prefix (committed out of
order by a multi-step draft, or an argmax draft) is verified as a point mass q = δ_x. A
position cut off (adaptive length, or no room left) is never accepted, and the token there is
drawn from p: so every emitted token is distributed exactly as the teacher's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -jnp.inf


def transfer_schedule(gamma: int, steps: int) -> list[int]:
    """How many positions each denoising step commits (LLaDA's even split)."""
    base, extra = divmod(gamma, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def restricted(logits_bgv, allowed_v, temperature: float):
    """log-probabilities over the allowed student tokens at `temperature` (1 when 0)."""
    z = jnp.where(allowed_v, logits_bgv, NEG) / (temperature or 1.0)
    return jax.nn.log_softmax(z, axis=-1)


def draft(logits_fn, tokens_bl, cols_bg, allowed_v, key, *, steps: int, temperature: float):
    """γ student ids per row, filled at columns cols_bg of tokens_bl (mask tokens there).

    logits_fn(tokens_bl) -> float32 [B, γ, V_student] at the draft columns. Each of `steps`
    denoising steps commits the still-masked positions with the highest top probability
    (LLaDA's low-confidence remasking; γ split evenly), drawn at `temperature` (0: argmax).
    Returns (ids [B, γ], confidence [B, γ] the top probability when committed, logq_bgv the
    law each was drawn from (None for argmax drafts), exact [B, γ]: that law is the token's
    law given every token to its left)."""
    batch, gamma = cols_bg.shape
    ids = jnp.zeros((batch, gamma), jnp.int32)
    conf = jnp.zeros((batch, gamma), jnp.float32)
    when = jnp.full((batch, gamma), steps, jnp.int32)
    logq = None
    rows = jnp.arange(batch)[:, None]
    for step, count in enumerate(transfer_schedule(gamma, steps)):
        logp = restricted(logits_fn(tokens_bl), allowed_v, temperature)
        top = jnp.exp(jnp.max(logp, axis=-1))
        free = when == steps
        rank = jnp.argsort(jnp.argsort(-jnp.where(free, top, -1.0), axis=-1), axis=-1)
        chosen = free & (rank < count)
        if temperature == 0:
            pick = jnp.argmax(logp, axis=-1).astype(jnp.int32)
        else:
            key, sub = jax.random.split(key)
            pick = jax.random.categorical(sub, logp, axis=-1).astype(jnp.int32)
            logq = logp if logq is None else jnp.where(chosen[..., None], logp, logq)
        ids = jnp.where(chosen, pick, ids)
        conf = jnp.where(chosen, top, conf)
        when = jnp.where(chosen, step, when)
        tokens_bl = tokens_bl.at[rows, cols_bg].set(jnp.where(chosen, pick, tokens_bl[rows, cols_bg]))
    exact = jax.lax.cummax(when, axis=1) <= when
    return ids, conf, logq, exact & (temperature != 0)


def valid_positions(conf_bg, limit_b, threshold: float | None):
    """bool [B, γ]: draft positions that may be accepted: before the row's limit (room left)
    and, with a threshold, before the first position whose confidence falls below it."""
    gamma = conf_bg.shape[1]
    valid = jnp.arange(gamma)[None, :] < limit_b[:, None]
    if threshold is not None:
        valid &= jnp.cumprod(conf_bg >= threshold, axis=1).astype(bool)
    return valid


def _first_false(ok_bg):
    return jnp.sum(jnp.cumprod(ok_bg, axis=1), axis=1).astype(jnp.int32)


def accept_greedy(logits_bkv, draft_t_bg, valid_bg):
    """(accepted count n [B], the teacher's token after them [B]): x_j accepted iff it is the
    teacher's argmax (and valid); then the argmax at n."""
    best = jnp.argmax(logits_bkv, axis=-1).astype(jnp.int32)
    n = _first_false((draft_t_bg == best[:, :-1]) & valid_bg)
    return n, jnp.take_along_axis(best, n[:, None], axis=1)[:, 0]


def accept_sampled(logits_bkv, draft_t_bg, valid_bg, logq_x_bg, q_row_fn, temperature, key):
    """As accept_greedy for sampled decoding (module docstring). logq_x_bg: log q_j(x_j)
    (0 for a point mass); q_row_fn(n_b) -> the law of the draft at n in teacher ids [B, V_t]
    (a one-hot for a point mass)."""
    k_u, k_draw = jax.random.split(key)
    logp = jax.nn.log_softmax(logits_bkv / temperature, axis=-1)
    logp_x = jnp.take_along_axis(logp[:, :-1], draft_t_bg[..., None], axis=2)[..., 0]
    u = jax.random.uniform(k_u, draft_t_bg.shape)
    n = _first_false((jnp.log(u) < jnp.minimum(0.0, logp_x - logq_x_bg)) & valid_bg)
    p_n = jnp.exp(jnp.take_along_axis(logp, n[:, None, None], axis=1)[:, 0])
    rejected = jnp.take_along_axis(jnp.pad(valid_bg, ((0, 0), (0, 1))), n[:, None], axis=1)[:, 0]
    residual = jnp.maximum(p_n - q_row_fn(n), 0.0)
    total = jnp.sum(residual, axis=-1, keepdims=True)
    # p == q up to rounding: a rejection of probability ~0; draw from p itself.
    law = jnp.where(rejected[:, None] & (total > 1e-6), residual / jnp.maximum(total, 1e-30), p_n)
    token = jax.random.categorical(k_draw, jnp.log(law), axis=-1).astype(jnp.int32)
    return n, token


def emitted(draft_t_bg, n_b, token_b, active_b):
    """int32 [B, γ + 1]: the accepted draft then the teacher's token, -1 after; count [B]
    (0 for a finished row)."""
    j = jnp.arange(draft_t_bg.shape[1] + 1)[None, :]
    padded = jnp.pad(draft_t_bg, ((0, 0), (0, 1)))
    out = jnp.where(j < n_b[:, None], padded, jnp.where(j == n_b[:, None], token_b[:, None], -1))
    return jnp.where(active_b[:, None], out, -1), jnp.where(active_b, n_b + 1, 0)
