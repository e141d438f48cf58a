"""Compiled memory of the distillation loss + gradient at the real LLaDA-8B LM head.

Compares `loss.distill_loss` through both cuts of the LM head (vocabulary tiles, the default;
sequence chunks), remat, with `loss.dense_distill_loss` (the full [B, L, V] logits), all as
jax.jit(value_and_grad w.r.t. hidden and head), lowered and compiled for abstract inputs (nothing
is allocated), and reads XLA's temp-buffer figure. Then checks, at a small shape with real
numbers, that all give the same loss and gradients.

    python bench/loss_memory.py [--vocab-tile 4096] [--chunk-size 256] [--seq-len 4096]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # XLA:CPU's figures; keeps libtpu, if installed, out

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax.distill import chunked_head, loss

GIB = 1024 ** 3


def loss_and_grad(fn, argnums=(0, 1), **kw):
    return jax.jit(jax.value_and_grad(
        lambda h, w, ids, lp, m: fn(h, w, ids, lp, m, **kw)[0], argnums=argnums))


def abstract_inputs(b, seq, d, v, k, hidden_dtype, head_dtype):
    return (jax.ShapeDtypeStruct((b, seq, d), hidden_dtype),
            jax.ShapeDtypeStruct((d, v), head_dtype),
            jax.ShapeDtypeStruct((b, seq, k), jnp.int32),
            jax.ShapeDtypeStruct((b, seq, k), jnp.float32),
            jax.ShapeDtypeStruct((b, seq), jnp.bool_))


def temp_bytes(fn, args, argnums=(0, 1), **kw) -> int:
    compiled = loss_and_grad(fn, argnums, **kw).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def value_check(cuts: dict[str, dict]) -> None:
    """Max relative difference chunked vs dense (loss and both gradients) at B=2, L=300, V=4000."""
    rng = np.random.default_rng(0)
    b, seq, d, v, k = 2, 300, 64, 4000, 16
    hidden = jnp.asarray(rng.normal(size=(b, seq, d)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), jnp.float32)
    ids = jnp.asarray(np.argsort(rng.random((b, seq, v)), -1)[..., :k], jnp.int32)
    lp = np.sort(np.log(rng.dirichlet(np.ones(v), size=(b, seq))[..., :k]), -1)[..., ::-1]
    mask = jnp.asarray(rng.random((b, seq)) < 0.8)
    args = (hidden, head, ids, jnp.asarray(lp.copy(), jnp.float32), mask)
    dense = loss_and_grad(loss.dense_distill_loss)(*args)
    print(f"value check (B={b}, L={seq}, D={d}, V={v}, k={k}): loss dense {float(dense[0]):.6f}")
    for name, cut in cuts.items():
        chunked = loss_and_grad(loss.distill_loss, **cut)(*args)
        diffs = [float(jnp.max(jnp.abs(a - c)) / jnp.max(jnp.abs(a)))
                 for a, c in zip(jax.tree.leaves(dense), jax.tree.leaves(chunked))]
        print(f"  {name}: loss {float(chunked[0]):.6f}; max relative difference "
              f"(loss, d hidden, d head) {max(diffs):.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=126464)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--vocab-tile", type=int, default=chunked_head.VOCAB_TILE)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--kinds", default="kl,tvd,alpha,lk",
                        help="loss kinds whose memory is compared with KL's (goal: within 10%%)")
    args = parser.parse_args()

    shape = (args.batch, args.seq_len, args.d_model, args.vocab, args.top_k)
    inputs = abstract_inputs(*shape, hidden_dtype=jnp.bfloat16, head_dtype=jnp.float32)
    cuts = {f"vocab tiles of {args.vocab_tile}":
            dict(chunk_axis="vocab", vocab_tile=args.vocab_tile),
            f"sequence chunks of {args.chunk_size}":
            dict(chunk_axis="sequence", chunk_size=args.chunk_size)}
    print(f"backend {jax.default_backend()}, jax {jax.__version__}")
    print("setup: value_and_grad of the KL loss w.r.t. hidden [B, L, D] bf16 and head [D, V] fp32"
          f"; B={shape[0]} L={shape[1]} D={shape[2]} V={shape[3]} k={shape[4]}; teacher ids int32,"
          " log-probs fp32, loss mask bool; jit + lower + compile on abstract inputs")
    start = time.perf_counter()
    logits = shape[0] * shape[1] * shape[3] * 4
    head_grad = shape[2] * shape[3] * 4
    print(f"one fp32 [B, L, V] logits tensor: {logits / GIB:.3f} GiB; "
          f"fp32 [D, V] head gradient: {head_grad / GIB:.3f} GiB")
    for argnums, what in (((0, 1), "d hidden and d head"), ((0,), "d hidden only")):
        dense = temp_bytes(loss.dense_distill_loss, inputs, argnums)
        print(f"[{what}] temp bytes, dense: {dense / GIB:.3f} GiB ({dense})")
        for name, cut in cuts.items():
            chunked = temp_bytes(loss.distill_loss, inputs, argnums, **cut)
            print(f"    {name}: {chunked / GIB:.3f} GiB ({chunked}); ratio {chunked / dense:.4f}"
                  f" = 1/{dense / chunked:.1f} of dense (goal <= 1/8)")
    for name, cut in cuts.items():  # d hidden and d head, each kind against KL
        kl = temp_bytes(loss.distill_loss, inputs, (0, 1), kind="kl", **cut)
        for kind in args.kinds.split(","):
            got = temp_bytes(loss.distill_loss, inputs, (0, 1), kind=kind, **cut)
            print(f"    {name}, kind {kind}: {got / GIB:.3f} GiB; {got / kl:.3f} x KL's "
                  "(goal <= 1.10)")
    print(f"[compile {time.perf_counter() - start:.1f} s]")
    value_check({"vocab tiles of 512": dict(chunk_axis="vocab", vocab_tile=512),
                 "sequence chunks of 64": dict(chunk_axis="sequence", chunk_size=64)})


if __name__ == "__main__":
    main()
