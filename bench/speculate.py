#!/usr/bin/env python3
"""The speculative engine against its own teacher-only run, and where a block's time goes.

    python bench/speculate.py [--pairs demo synthetic] [--contexts 64 256 1024] \
        [--batch-sizes 1 8] [--gamma 4] [--max-new-tokens 32] [--drafter-cache prefix]

For each pair, context (prompt tokens) and batch size, one engine (greedy, TLI) decodes
`batch` prompts speculatively and then alone (the same engine, one cached k = 1 step per
token, the same attention buckets; every shape compiled before timing) and prints tokens per
target call, both rates and the wall-clock speedup; then the per-block time split: the
drafter's part and the verify part (each compiled alone, device time), the whole block as
compiled, and the wall time per block in the decoding loop (so the host's share).

Pairs: `demo` is the shipped demo student + teacher (about 1:1 in cost, so it cannot win
much); `synthetic` is a random-init 1:9.7 pair (drafter d 64 x 2 layers, teacher d 192 x 4,
one 2,048 vocabulary; FLOPs per token) whose drafts are never right: it measures costs and
scaling (drafter cost vs context, host share, batch throughput), not acceptance.

"not drafter/verify" = (wall per block - drafter - verify) / wall per block, where drafter
and verify are a window block's (prefix cache): it holds the host's work AND the amortised
full-forward refresh blocks (their device time: "refresh block ms", one every --refresh-every
blocks or --refresh-tokens tokens), which dominate at long contexts.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchlib import load  # noqa: E402
from llada_jax.checkpoints import load_model  # noqa: E402
from llada_jax.commands.demo import ASSETS  # noqa: E402
from llada_jax.speculate import loop as sp  # noqa: E402
from llada_jax.speculate.vocab_bridge import VocabBridge  # noqa: E402
from llada_jax.model.config import ModelConfig  # noqa: E402
from llada_jax.model.modeling import LLaDAModel  # noqa: E402
from llada_jax.speculate import engine as eng  # noqa: E402
from llada_jax.speculate.context import EngineBridge, IdBridge  # noqa: E402

STUDENT_TOK, TEACHER_TOK = str(ASSETS / "student_tokenizer"), str(ASSETS / "teacher_tokenizer")


def demo_pair():
    student = load_model(ASSETS / "student")[1]
    teacher = load_model(ASSETS / "teacher", compute_dtype="float32")[1]
    vb = VocabBridge(STUDENT_TOK, TEACHER_TOK, "tli", student_vocab_size=student.cfg.vocab_size,
                     teacher_vocab_size=teacher.cfg.vocab_size,
                     mask_token_id=student.cfg.mask_token_id)
    text = (ASSETS / "corpus_heldout.txt").read_text()

    def prompts(context: int, n: int) -> list[str]:
        """n windows of held-out text of about `context` teacher tokens each."""
        ids = vb.teacher_hf(text)["input_ids"][1:]
        return [vb.text(ids[i * 997:i * 997 + context - 1]) for i in range(n)]
    # No stop ids: every prompt decodes max_new_tokens (the same work for both runs).
    return student, teacher, EngineBridge.from_vocab_bridge(vb), prompts, set()


def synthetic_pair():
    common = dict(vocab_size=2048, n_heads=4, dtype="float32", eos_token_id=None)
    student = LLaDAModel(ModelConfig(d_model=64, n_layers=2, n_kv_heads=4, mlp_hidden_size=192,
                                     mask_token_id=2047, causal=False, **common), rngs=nnx.Rngs(0))
    teacher = LLaDAModel(ModelConfig(d_model=192, n_layers=4, n_kv_heads=2, mlp_hidden_size=576,
                                     mask_token_id=None, causal=True, model_type="llama", **common),
                         rngs=nnx.Rngs(1))
    bridge = IdBridge(np.arange(2048), np.ones(2048, bool), np.arange(2048))
    rng = np.random.default_rng(0)
    return student, teacher, bridge, \
        lambda context, n: rng.integers(0, 2047, (n, context)).tolist(), set()


def _time(fn, args, state_at, reps=5):
    """(median seconds of fn(*args), the last args): the donated state (args[i] <- out[j] for
    (i, j) in state_at) is fed back from each call's output; one untimed call first."""
    args, times = list(args), []
    for rep in range(reps + 1):
        t = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        if rep:
            times.append(time.perf_counter() - t)
        for i, j in state_at:
            args[i] = out[j]
    return float(np.median(times)), args


def split(engine: eng.SpeculativeEngine, prompts, window: bool) -> dict:
    """Device ms of the drafter part, the verify part and the whole compiled block, on the
    prompts' first block (window: against the drafter cache after one refresh block)."""
    rows = engine._start(prompts)
    engine._plan(rows)
    last = engine._prefill_batch(rows)
    packed, k = engine._pack(rows, False)
    refresh_s = None
    if window:  # fill the drafter cache with one real refresh block (timed once)
        fn, _ = engine._block(False, k)
        t = time.perf_counter()
        out, engine.d_cache, engine.t_cache, last, _ = fn(
            engine.d_state, engine.t_state, engine.tables, engine.d_cache, engine.t_cache, last,
            engine.put(packed), jax.random.key(0))
        out = np.asarray(out)
        refresh_s = time.perf_counter() - t
        engine._take(rows, np.asarray(out), False)
        packed, k = engine._pack(rows, True)
    s, (t_limit, s_limit) = engine.s, engine._limits(k)
    width, packed, key = packed.shape[1] - 4, engine.put(packed), jax.random.key(0)
    d_limit = s_limit if window else 0
    draft = jax.jit(functools.partial(eng.draft_part, engine.d_gd, s=s, width=width,
                                      window=window, d_limit=d_limit), donate_argnums=(2,))
    cached = engine.d_cache is not None
    drafter_s, d_args = _time(draft, (engine.d_state, engine.tables[1], engine.d_cache, packed,
                                      key), [(2, 4)] if cached else [])
    ids, conf, logq, exact, d_cache = draft(*d_args)
    verify = jax.jit(functools.partial(eng.verify_part, engine.t_gd, s=s, t_limit=t_limit),
                     donate_argnums=(3,))
    limit, active = packed[:, width + 2], packed[:, width + 3].astype(bool)
    verify_s, v_args = _time(verify, (engine.t_state, *engine.tables, engine.t_cache, last, ids,
                                      conf, logq, exact, limit, active, key), [(3, 1)])
    block, _ = engine._block(window, k)
    block_s, _ = _time(block, (engine.d_state, engine.t_state, engine.tables, d_cache,
                               v_args[3], last, packed, key), [(3, 1), (4, 2)])
    return {"drafter_ms": 1e3 * drafter_s, "verify_ms": 1e3 * verify_s, "block_ms": 1e3 * block_s,
            "refresh_ms": None if refresh_s is None else 1e3 * refresh_s}


def measure(pair, name: str, context: int, batch: int, args) -> None:
    student, teacher, bridge, make_prompts, stop = pair
    prompts = make_prompts(context, batch)
    settings = eng.EngineSettings(gamma=args.gamma, trailing_masks=args.trailing_masks,
                                  max_new_tokens=args.max_new_tokens, batch_size=batch,
                                  drafter_cache=args.drafter_cache)
    engine = eng.SpeculativeEngine(student, teacher, bridge, settings, stop_ids=stop)
    spec, alone = engine.generate(prompts), engine.teacher_only(prompts)
    tokens, seconds = sum(len(r["ids"]) for r in spec), sum(r["seconds"] for r in spec)
    a_tokens, a_seconds = sum(len(r["ids"]) for r in alone), sum(r["seconds"] for r in alone)
    blocks = max(len(r["blocks"]) for r in spec)
    calls = sum(r["target_calls"] for r in spec)
    parts = split(engine, prompts, window=args.drafter_cache == "prefix")
    wall = 1e3 * seconds / blocks
    other = 100 * max(0.0, wall - parts["drafter_ms"] - parts["verify_ms"]) / wall
    print(f"{name} | {context} | {batch} | {tokens / calls:.2f} | {tokens / seconds:.0f} | "
          f"{a_tokens / a_seconds:.0f} | {(tokens / seconds) / (a_tokens / a_seconds):.2f}x | "
          f"{wall:.2f} | {parts['drafter_ms']:.2f} | {parts['verify_ms']:.2f} | "
          f"{parts['block_ms']:.2f} | {other:.0f}% | {parts['refresh_ms'] or 0:.1f} | "
          f"{engine.compile_seconds:.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", nargs="+", default=["demo", "synthetic"],
                        choices=["demo", "synthetic"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--trailing-masks", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--drafter-cache", default="prefix", choices=eng.DRAFTER_CACHES)
    args = parser.parse_args()
    print(f"greedy, TLI, γ {args.gamma}, trailing {args.trailing_masks}, {args.max_new_tokens} new "
          f"tokens, drafter cache {args.drafter_cache}; {load()}")
    print("pair | context | batch | tokens/call | spec tok/s | teacher-only tok/s | speedup | "
          "wall ms/block | drafter ms | verify ms | block ms (compiled) | not drafter/verify | "
          "refresh block ms | compile s")
    for name in args.pairs:
        pair = demo_pair() if name == "demo" else synthetic_pair()
        for context in args.contexts:
            for batch in args.batch_sizes:
                measure(pair, name, context, batch, args)


if __name__ == "__main__":
    main()
