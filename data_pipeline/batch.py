"""The batch: what the loader yields and the train step, eval and TPU compiles take.

A batch is a dict of arrays over B rows of L positions (K teacher slots per position):
    tokens            int32   [B, L]     student ids (0 in padding)
    positions         int32   [B, L]     position within the row's example (restarts per segment)
    segment_ids       int32   [B, L]     1..n = the packed example a position belongs to, 0 = padding
    prompt_mask       bool    [B, L]     prompt positions (never masked, never in the loss)
    target_mask       bool    [B, L]     positions with a teacher target
    teacher_ids       int32   [B, L, K]  student-vocab ids of the teacher's top-k (0 unused)
    teacher_logprobs  float32 [B, L, K]  the teacher's log-probs at T = 1 (-inf unused)
Values in padding (and unused slots) are the fields' pad values, so a padded row adds nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

Batch = dict  # field name -> array (NumPy from the loader, jax.Array inside the step)


class Field(NamedTuple):
    dtype: type
    pad: object
    per_slot: bool  # [B, L, K] (a value per teacher slot) rather than [B, L]


FIELDS: dict[str, Field] = {
    "tokens": Field(np.int32, 0, False),
    "positions": Field(np.int32, 0, False),
    "segment_ids": Field(np.int32, 0, False),
    "prompt_mask": Field(np.bool_, False, False),
    "target_mask": Field(np.bool_, False, False),
    "teacher_ids": Field(np.int32, 0, True),
    "teacher_logprobs": Field(np.float32, -np.inf, True),
}
PAD = {name: f.pad for name, f in FIELDS.items()}
# The fields a stored example gives per position; packing adds positions and segment_ids.
EXAMPLE_FIELDS = ("tokens", "prompt_mask", "target_mask", "teacher_ids", "teacher_logprobs")


def field_shape(name: str, shape: tuple[int, int, int]) -> tuple[int, ...]:
    b, l, k = shape
    return (b, l, k) if FIELDS[name].per_slot else (b, l)


def abstract(shape: tuple[int, int, int]) -> dict:
    """{field: jax.ShapeDtypeStruct} of a (B, L, K) batch, for compiling without data."""
    import jax  # data_pipeline itself runs without JAX

    return {name: jax.ShapeDtypeStruct(field_shape(name, shape), f.dtype)
            for name, f in FIELDS.items()}


def synthetic(rng: np.random.Generator, shape: tuple[int, int, int], *, vocab_size: int,
              segments: list[tuple[int, int]] | None = None, exclude_id: int | None = None
              ) -> Batch:
    """A random batch in the loader's format, for tests and benchmarks.

    Every row holds `segments` [(prompt length, response length), ...] packed one after the
    other, then padding; default one example filling the row with the first quarter prompt.
    tokens are uniform over the vocabulary minus `exclude_id` (e.g. the mask id); every response
    position has a target: K distinct ids with sorted log-probs of a random distribution over
    K + 1 buckets (so the tail holds the rest of the mass).
    """
    b, l, k = shape
    segments = segments or [(l // 4, l - l // 4)]
    if sum(p + r for p, r in segments) > l:
        raise ValueError(f"segments {segments} do not fit in a row of {l} positions")
    out = {name: np.full(field_shape(name, shape), f.pad, f.dtype) for name, f in FIELDS.items()}
    start = 0
    for sid, (n_prompt, n_response) in enumerate(segments, start=1):
        end = start + n_prompt + n_response
        out["segment_ids"][:, start:end] = sid
        out["positions"][:, start:end] = np.arange(end - start)
        out["prompt_mask"][:, start:start + n_prompt] = True
        start = end
    real = out["segment_ids"] > 0
    tokens = rng.integers(0, vocab_size - (exclude_id is not None), (b, l))
    if exclude_id is not None:
        tokens = tokens + (tokens >= exclude_id)
    out["tokens"] = np.where(real, tokens, 0).astype(np.int32)
    target = real & ~out["prompt_mask"]
    out["target_mask"] = target
    # Distinct ids: a random start plus increasing steps that add up to less than V.
    steps = rng.integers(1, max(vocab_size // k, 1) + 1, (b, l, k))
    steps[..., 0] = rng.integers(0, vocab_size, (b, l))
    ids = np.cumsum(steps, axis=-1) % vocab_size
    probs = rng.gamma(1.0, size=(b, l, k + 1))
    probs /= probs.sum(-1, keepdims=True)
    logprobs = np.sort(np.log(probs[..., :k]), axis=-1)[..., ::-1]
    out["teacher_ids"] = np.where(target[..., None], ids, 0).astype(np.int32)
    out["teacher_logprobs"] = np.where(target[..., None], logprobs, -np.inf).astype(np.float32)
    return out
