"""Drafting with LLaDA: the next γ positions after the verified text, filled by n denoising steps.

The drafter sees `context + [mask] * (γ + trailing_masks)`: the trailing masks tell the
bidirectional model that text goes on after the block; they are never filled. With n = 1 every
block position is filled from one forward pass. With n > 1 (LLaDA's low-confidence remasking,
`generate.py` of the LLaDA repository) each step commits the still-masked block positions the
model is most sure of, γ split evenly over the steps (earlier steps take the remainder), and
the next step conditions on them.

One difference from LLaDA: it ranks positions by the confidence of the sampled token; here the
rank is the top probability of each position's distribution (the same at temperature 0), and
the token is drawn after the choice. So which positions commit never depends on the draw, and
each committed token is an exact draw from the q recorded with it, which lossless verification
needs. A token committed before some position to its left was conditioned on nothing the
verifier will accept first; its q is not its law given the accepted prefix, so it is marked
`exact[j] = False` and verified as a point mass (see `rejection`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada_jax.decode.buckets import LENGTH_BUCKET, WIDTH_BUCKET, bucket
from llada_jax.speculate import rejection

@dataclasses.dataclass
class Draft:
    """γ student token ids, the law each was drawn from (q_rows[j]: float64 [V_student]) and
    whether q_rows[j] is that token's law given every token to its left."""
    ids: list[int]
    q_rows: list[np.ndarray]
    exact: list[bool]


@functools.partial(jax.jit, static_argnames=("graphdef", "width", "vocab_size"))
def block_logits(graphdef, state, tokens_bl, n_real, start, *, width: int, vocab_size: int):
    """float32 [width, vocab_size]: logits at positions start..start+width-1 of row 0 (keys
    beyond n_real are padding; rows past the end of tokens_bl repeat the last one)."""
    model = nnx.merge(graphdef, state)
    cols = jnp.arange(tokens_bl.shape[1])
    hidden_bld = model(tokens_bl, attention_mask_bl=(cols < n_real)[None, :], return_hidden=True)
    hidden_wd = jax.lax.dynamic_slice_in_dim(hidden_bld[0], start, width, axis=0)
    return jnp.einsum("wd,dv->wv", hidden_wd, model.lm_head_weight().astype(hidden_wd.dtype),
                      preferred_element_type=jnp.float32)[:, :vocab_size]


def transfer_schedule(gamma: int, steps: int) -> list[int]:
    """How many positions each denoising step commits (LLaDA's even split)."""
    base, extra = divmod(gamma, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


class Drafter:
    """A bidirectional LLaDA model drafting blocks of `gamma` tokens.

    allowed_v bool [V_student]: the tokens the drafter may propose (the verification vocabulary:
    the TLI intersection, or everything but the mask token); its distributions are restricted
    and renormalised to them. temperature 0 = argmax with a point-mass q.
    """

    def __init__(self, model, allowed_v: np.ndarray, *, gamma: int, steps: int = 1,
                 trailing_masks: int = 0, temperature: float = 1.0):
        if not 1 <= steps <= gamma:
            raise ValueError(f"need 1 <= steps <= gamma, got steps {steps}, gamma {gamma}")
        self.cfg = model.cfg
        self.graphdef, self.state = nnx.split(model)
        self.gamma, self.steps, self.trailing = gamma, steps, trailing_masks
        self.temperature = temperature
        self.allowed = np.asarray(allowed_v, bool)[:self.cfg.vocab_size]
        self.forward_passes = 0

    def _distributions(self, logits_wv: np.ndarray) -> np.ndarray:
        logits = np.where(self.allowed, logits_wv.astype(np.float64), -np.inf)
        if self.temperature == 0:
            return np.eye(logits.shape[-1])[np.argmax(logits, axis=-1)]
        return rejection.softmax(logits, self.temperature)

    def draft(self, context: list[int], rng: np.random.Generator) -> Draft:
        width = self.gamma + self.trailing
        n_real = len(context) + width
        rows = bucket(self.gamma, WIDTH_BUCKET)
        length = bucket(max(n_real, len(context) + rows), LENGTH_BUCKET)
        tokens = np.full(length, self.cfg.mask_token_id, np.int32)
        tokens[:len(context)] = context
        ids = [-1] * self.gamma
        q_rows: list[np.ndarray | None] = [None] * self.gamma
        committed_at = [0] * self.gamma
        for step, count in enumerate(transfer_schedule(self.gamma, self.steps)):
            logits = np.asarray(block_logits(self.graphdef, self.state, jnp.asarray(tokens[None]),
                                             n_real, len(context), width=rows,
                                             vocab_size=self.cfg.vocab_size))
            self.forward_passes += 1
            probs = self._distributions(logits[:self.gamma])
            masked = [j for j in range(self.gamma) if ids[j] < 0]
            for j in sorted(masked, key=lambda j: -probs[j].max())[:count]:
                token = int(np.argmax(probs[j])) if self.temperature == 0 else rejection.sample(probs[j], rng)
                ids[j], q_rows[j], committed_at[j] = token, probs[j], step
                tokens[len(context) + j] = token
        exact = [all(committed_at[i] <= committed_at[j] for i in range(j)) for j in range(self.gamma)]
        return Draft(ids, q_rows, exact)
