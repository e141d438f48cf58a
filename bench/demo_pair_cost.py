#!/usr/bin/env python
"""The demo pair's cost ratio: teacher vs drafter FLOPs per token position and wall clock per
forward on this CPU (a demo pair that can show a speedup needs the teacher >= 8x the drafter per token).

    python bench/demo_pair_cost.py [--contexts 64 256] [--repeats 30]

Both models are the shipped ones (llada_jax/demo_assets/teacher and student), float32 compute.
FLOPs per token position are counted from the shapes: 2 x the weights a position multiplies by
(LM head included) + 4 x layers x attention width x context (scores and values). (XLA's CPU
cost analysis is no help here: it counts a scanned layer stack once and the bf16 -> f32 weight
converts as FLOPs.) For each context C it prints the wall clock (median of `--repeats` calls) of:
  - a full forward over C positions, both models (the teacher's prefill; the drafter's call
    without a prefix cache re-encodes the whole context like this);
  - the teacher's cached step (teacher/decode.py CachedLM.extend) at k = 1 (teacher-only
    decoding: one per token) and k = 5 (a γ = 4 verify call), cache of C + 64 slots filled to C;
  - the drafter's draft-block call as `speculate` runs it today (speculate/draft.block_logits:
    context + γ + trailing masks, bucketed): one per block.
Every shape is compiled and run once before it is timed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import benchlib  # noqa: E402
from llada_jax.commands.demo import ASSETS  # noqa: E402
from llada_jax.checkpoints import load_model  # noqa: E402
from llada_jax.decode.buckets import LENGTH_BUCKET, WIDTH_BUCKET, bucket  # noqa: E402
from llada_jax.speculate import draft  # noqa: E402
from llada_jax.decode.cached import CachedLM  # noqa: E402

GAMMA, TRAILING = 4, 4  # `speculate`'s defaults


def matmul_params(model) -> int:
    """Weights a token position multiplies by: every >= 2-D param except the (tied) embedding,
    plus one vocab x d head."""
    cfg = model.cfg
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    body = sum(int(np.prod(x.shape)) for path, x in leaves
               if x.ndim >= 2 and "wte" not in jax.tree_util.keystr(path))
    return body + cfg.vocab_size * cfg.d_model


def flops_per_position(model, context: int) -> float:
    """2 x matmul params + the attention over `context` keys (QK^T and PV)."""
    cfg = model.cfg
    return 2 * matmul_params(model) + 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * context


def median_ms(call, repeats: int) -> float:
    jax.block_until_ready(call())  # compiled and run once before timing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def forward_ms(model, context: int, repeats: int) -> float:
    """A full forward over `context` positions, batch 1."""
    split, tokens = nnx.split(model), jnp.ones((1, context), jnp.int32)
    forward = jax.jit(lambda split, tokens: nnx.merge(*split)(tokens))
    return median_ms(lambda: forward(split, tokens), repeats)


def cached_step_ms(teacher, context: int, k: int, repeats: int) -> float:
    """One cached teacher call appending k tokens to a cache filled to `context`."""
    lm = CachedLM(teacher, batch_size=1, max_length=context + 64)
    lm.prefill(np.ones((1, context), np.int32), np.zeros(1, np.int32))
    tokens = jnp.ones((1, k), jnp.int32)

    def step():
        out = lm.extend(tokens)
        lm.rollback(np.array([context]))
        return out

    return median_ms(step, repeats)


def draft_block_ms(drafter, context: int, repeats: int) -> tuple[int, float]:
    """(positions encoded, ms) of the host loop's draft-block call (no prefix cache) at `context`."""
    rows = bucket(GAMMA, WIDTH_BUCKET)
    length = bucket(context + max(GAMMA + TRAILING, rows), LENGTH_BUCKET)
    graphdef, state = nnx.split(drafter)
    tokens = jnp.ones((1, length), jnp.int32)
    return length, median_ms(lambda: draft.block_logits(
        graphdef, state, tokens, context + GAMMA + TRAILING, context, width=rows,
        vocab_size=drafter.cfg.vocab_size), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    teacher = load_model(ASSETS / "teacher", compute_dtype="float32")[1]
    drafter = load_model(ASSETS / "student", compute_dtype="float32")[1]
    print(f"demo pair on {jax.devices()[0].platform}, {benchlib.load()}")
    for name, m in (("teacher", teacher), ("drafter", drafter)):
        c = m.cfg
        print(f"  {name}: d {c.d_model}, {c.n_layers} layers, {c.n_heads}/{c.n_kv_heads} heads, "
              f"FFN {c.mlp_hidden_size}, vocab {c.vocab_size}, causal {c.causal}, "
              f"{matmul_params(m) / 1e6:.3f} M matmul params")
    print("\ncontext | what | teacher | drafter | teacher / drafter")
    print("---|---|---|---|---")
    for context in args.contexts:
        t_fl, d_fl = flops_per_position(teacher, context), flops_per_position(drafter, context)
        print(f"{context} | MFLOP per token position | {t_fl / 1e6:.2f} | {d_fl / 1e6:.2f} | "
              f"{t_fl / d_fl:.2f}x")
        t_ms, d_ms = forward_ms(teacher, context, args.repeats), forward_ms(drafter, context,
                                                                           args.repeats)
        print(f"{context} | full forward over {context} positions, ms | {t_ms:.2f} | {d_ms:.2f} | "
              f"{t_ms / d_ms:.2f}x")
        k1_ms = cached_step_ms(teacher, context, 1, args.repeats)
        k5_ms = cached_step_ms(teacher, context, GAMMA + 1, args.repeats)
        length, b_ms = draft_block_ms(drafter, context, args.repeats)
        print(f"{context} | teacher cached step k=1 (teacher alone: one per token), ms | "
              f"{k1_ms:.2f} | - | -")
        print(f"{context} | teacher verify k={GAMMA + 1} vs the host loop's drafter block call "
              f"({length} positions: no prefix cache), ms | {k5_ms:.2f} | {b_ms:.2f} | "
              f"{k5_ms / b_ms:.2f}x")


if __name__ == "__main__":
    main()
