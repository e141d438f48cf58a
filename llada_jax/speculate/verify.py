"""The teacher's side of speculative decoding: `score(context, draft) -> logits [len(draft) + 1, V]`
(row j: the next-token logits before draft[j], the last row after the whole draft), with a
`calls` counter (target calls, the measure speculate reports).

    verifier = make_verifier("cached" | "recompute", teacher, longest_prompt, max_new_tokens)

`CachedVerifier` keeps a KV cache (appends what is new, rolls rejected draft tokens back);
`RecomputeVerifier` reruns the teacher over the whole sequence at every call (the reference).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada_jax.errors import SpeculateError
from llada_jax.decode.buckets import LENGTH_BUCKET, PROMPT_BUCKET, WIDTH_BUCKET, bucket
from llada_jax.decode.cached import CachedLM
from llada_jax.speculate.draft import block_logits

VERIFIERS = ("cached", "recompute")


class RecomputeVerifier:
    """The causal teacher rerun over context + draft for every call."""

    def __init__(self, model):
        if not model.cfg.causal:
            raise SpeculateError("the teacher is not causal (config.json llada_jax.causal is "
                                 "false): speculate verifies with a causal LM")
        self.vocab_size = model.cfg.vocab_size
        self.graphdef, self.state = nnx.split(model)
        self.calls = 0

    def score(self, context: list[int], draft: list[int]) -> np.ndarray:
        """float32 [len(draft) + 1, V]: row j is the teacher's next-token logits before draft[j]
        (the last row: after the whole draft)."""
        ids = context + draft
        width = bucket(len(draft) + 1, WIDTH_BUCKET)
        length = bucket(len(context) - 1 + width, LENGTH_BUCKET)
        tokens = np.zeros(length, np.int32)
        tokens[:len(ids)] = ids
        self.calls += 1
        logits = block_logits(self.graphdef, self.state, jnp.asarray(tokens[None]), len(ids),
                              len(context) - 1, width=width, vocab_size=self.vocab_size)
        return np.asarray(logits)[:len(draft) + 1]


class CachedVerifier:
    """The causal teacher with a KV cache (`teacher.decode.CachedLM`, one row): a call appends
    only what is new since the last one (the teacher's own token, then the draft) and rolls
    back the draft tokens that were rejected; a context that does not continue the cached one
    (a new prompt) is prefilled afresh.

    The logits after each token of the last call are kept, so after a rollback to c tokens the
    distribution after them is known without a call. Prompts are left-padded to `prompt_width`
    (one prefill compile) and extends to a multiple of WIDTH_BUCKET (one extend compile); the
    cache holds prompt_width + max_new_tokens + that padding (a draft never goes past the last
    new token).
    """

    def __init__(self, model, prompt_width: int, max_new_tokens: int):
        self.prompt_width = prompt_width
        self.lm = CachedLM(model, batch_size=1,
                           max_length=prompt_width + max_new_tokens + WIDTH_BUCKET + PROMPT_BUCKET)
        self.cached: list[int] = []
        self.rows_start, self.rows = 0, np.zeros((0, model.cfg.vocab_size), np.float32)
        self.vocab_size = model.cfg.vocab_size
        self.calls = 0

    def score(self, context: list[int], draft: list[int]) -> np.ndarray:
        """As RecomputeVerifier.score."""
        self.calls += 1
        common = next((i for i, (a, b) in enumerate(zip(self.cached, context)) if a != b),
                      min(len(self.cached), len(context)))
        if not self.rows_start <= common < self.rows_start + len(self.rows) or common == 0:
            width = max(self.prompt_width, bucket(len(context), PROMPT_BUCKET))
            tokens = np.zeros((1, width), np.int32)
            tokens[0, width - len(context):] = context
            first = np.asarray(self.lm.prefill(tokens, [width - len(context)]))
            common, suffix = len(context), []
        else:
            if common < len(self.cached):
                self.lm.rollback([common])
            first, suffix = self.rows[common - self.rows_start][None], context[common:]
        new = suffix + draft
        if new:  # padded to a bucket (one compile for every draft length), padding rolled back
            tokens = np.zeros((1, bucket(len(new), WIDTH_BUCKET)), np.int32)
            tokens[0, :len(new)] = new
            logits = np.asarray(self.lm.extend(tokens))[0, :len(new)]
            self.lm.rollback([len(context) + len(draft)])
            first = np.concatenate([first, logits])
        self.cached, self.rows_start, self.rows = context + draft, common, first
        return first[len(suffix):]


def make_verifier(kind: str, teacher, longest_prompt: int, max_new_tokens: int):
    """"cached" (KV cache sized for these prompts) or "recompute"."""
    if kind == "cached":
        return CachedVerifier(teacher, bucket(longest_prompt, PROMPT_BUCKET), max_new_tokens)
    return RecomputeVerifier(teacher)
