#!/usr/bin/env python
"""Teacher decoding: KV-cached vs full recomputation tokens/s, and a 70B decode memory plan.

    python bench/decode.py speed [--batch 8] [--new-tokens 128 512]
    python bench/decode.py plan  [--targets v5p-32 v5e-64 v6e-16] [--context 4096]

`speed` runs the demo teacher (llada_jax/demo_assets/teacher, float32) on this CPU: the cached
loop of generate-teacher (decode/cached.py: one prefill, then one cached step per token)
against the loop generate-teacher ran before the cache (every step a full forward over the
fixed-length left-padded buffer, the distribution read at the last filled column). Both
greedy, same prompts, no early stop; each timed after a warm-up run of the same shapes.

`plan` compiles one cached decode step of a Llama-3.3-70B-shaped teacher (80 layers, d 8192,
64 heads / 8 KV heads, FFN 28672, vocab 128256, llama3 RoPE, bf16 weights and cache) for each
TPU slice with the TPU compiler on this CPU (libtpu; tpu_compile.compile_decode_step, all 80
layers in one scan), and prints the compiler's per-device bytes and the largest batch whose
[batch, context] cache fits in HBM: two compiles give bytes per row (the cache is linear in
the batch), the predicted largest batch is then compiled to confirm it (stepping down by one
multiple of the batch sharding if it does not fit).
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchlib  # noqa: E402
from llada_jax.decode.buckets import PROMPT_BUCKET  # noqa: E402
from llada_jax.teacher import generate as gt  # noqa: E402

ASSETS = ROOT / "llada_jax" / "demo_assets"
GIB = 1024 ** 3


# ----------------------------------------------------------------------------- speed

@functools.partial(jax.jit, static_argnames=("graphdef",))
def _recompute_step(graphdef, state, tokens_bl, pad_b, column):
    """The pre-cache step: a full forward over the buffer, argmax at `column`, written at +1."""
    model = nnx.merge(graphdef, state)
    cols = jnp.arange(tokens_bl.shape[1])
    hidden = model(tokens_bl, positions_bl=jnp.maximum(cols[None] - pad_b[:, None], 0),
                   attention_mask_bl=cols[None] >= pad_b[:, None], return_hidden=True)
    hidden_bd = jax.lax.dynamic_index_in_dim(hidden, column, axis=1, keepdims=False)
    logits = hidden_bd @ model.lm_head_weight().astype(hidden_bd.dtype)
    chosen = jnp.argmax(logits[:, :model.cfg.vocab_size], axis=-1).astype(jnp.int32)
    return jax.lax.dynamic_update_slice_in_dim(tokens_bl, chosen[:, None], column + 1, axis=1)


def recompute_generate(model, prompts: list[list[int]], new_tokens: int,
                       steps: int | None = None) -> np.ndarray:
    width = -(-max(map(len, prompts)) // PROMPT_BUCKET) * PROMPT_BUCKET
    tokens = np.zeros((len(prompts), width + new_tokens), np.int32)
    pads = np.array([width - len(p) for p in prompts], np.int32)
    for r, p in enumerate(prompts):
        tokens[r, pads[r]:width] = p
    graphdef, state = nnx.split(model)
    tokens_bl = jnp.asarray(tokens)
    for step in range(new_tokens if steps is None else steps):
        tokens_bl = _recompute_step(graphdef, state, tokens_bl, jnp.asarray(pads), width - 1 + step)
    return np.asarray(tokens_bl)[:, width:]


def cached_generate(model, prompts: list[list[int]], new_tokens: int) -> np.ndarray:
    rows = gt.generate_batch(model, prompts, gt.Sampling(max_new_tokens=new_tokens), set(), 0,
                             model.cfg.vocab_size, jax.random.key(0), len(prompts), False)
    return np.array([row.ids for row in rows])


def _timed(fn, *args, **warm_up) -> tuple[float, np.ndarray]:
    fn(*args, **warm_up)  # compiles the shapes
    started = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - started, out


def speed(args) -> None:
    model, tok = gt.load_teacher(ASSETS / "teacher", ASSETS / "teacher_tokenizer")
    lines = (ASSETS / "prompts_train.txt").read_text().splitlines()[:args.batch]
    prompts = [tok(line)["input_ids"] for line in lines]
    print(f"{benchlib.load()}; demo teacher: {model.cfg.n_layers} layers, d {model.cfg.d_model}, vocab "
          f"{model.cfg.vocab_size}; batch {args.batch}, prompts {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens; {jax.devices()[0].platform}")
    print("| new tokens | recompute tokens/s | cached tokens/s | speed-up | same tokens |")
    print("|---:|---:|---:|---:|:---:|")
    for new in args.new_tokens:
        # RoPE has no length limit; the demo config's 256 is a data limit, lifted here.
        model.cfg = model.cfg.replace(max_sequence_length=max(model.cfg.max_sequence_length, 1024))
        slow, slow_ids = _timed(recompute_generate, model, prompts, new, steps=2)
        fast, fast_ids = _timed(cached_generate, model, prompts, new)
        count = args.batch * new
        print(f"| {new} | {count / slow:,.0f} | {count / fast:,.0f} | {slow / fast:.1f}x | "
              f"{'yes' if np.array_equal(slow_ids, fast_ids) else 'NO'} |", flush=True)


# ----------------------------------------------------------------------------- plan

def llama_70b_config():
    """Llama-3.3-70B-Instruct's published config.json, bf16 weights and compute."""
    from llada_jax.model.config import ModelConfig
    from llada_jax.model.llama_config import LLAMA_3_3_70B
    return ModelConfig.from_hf_config(LLAMA_3_3_70B, param_dtype="bfloat16", dtype="bfloat16")


def plan(args) -> None:
    from llada_jax.train import tpu_compile
    cfg = llama_70b_config()
    # KV heads (8) over `tensor`, the rest of the chips shard the weights' model dimension
    # (fsdp) and the rows of the batch.
    print("| slice | mesh | HBM/device | weights/device | bytes/row/device (cache + activations) | largest batch | "
          "bytes/device at it (args + temp) | compile |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for target in args.targets:
        devices = len(tpu_compile.topology_devices(target))
        # 8 KV heads over `tensor`; a 4x4 torus (v6e-16) cannot form an axis of 8: 4 there.
        tensor = 4 if target == "v6e-16" else 8
        mesh = {"data": 1, "fsdp": devices // tensor, "tensor": tensor}
        step = mesh["fsdp"]
        started = time.perf_counter()
        def compile_at(batch):  # None: the compiler found no schedule within HBM
            try:
                return tpu_compile.compile_decode_step(cfg, target, mesh, batch_size=batch,
                                                       max_length=args.context)
            except tpu_compile.OutOfHbm:
                return None

        small, large = compile_at(step), compile_at(2 * step)
        per_row = (large.total_bytes - small.total_bytes) / step
        fixed = small.total_bytes - per_row * step
        batch = int((small.hbm_bytes - fixed) // per_row) // step * step
        report = compile_at(batch)
        while (report is None or not report.fits) and batch > step:
            batch -= step
            report = compile_at(batch)
        weights = small.argument_bytes - per_row * step  # arguments minus the cache
        print(f"| {target} | data 1, fsdp {mesh['fsdp']}, tensor {tensor} | {report.hbm_bytes / GIB:.1f} GiB | "
              f"{weights / GIB:.2f} GiB | {per_row / 2**20:.1f} MiB | {batch} | "
              f"{report.total_bytes / GIB:.1f} GiB ({report.argument_bytes / GIB:.1f} + "
              f"{report.temp_bytes / GIB:.2f}) | {time.perf_counter() - started:.0f} s |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--new-tokens", type=int, nargs="+", default=[128, 512])
    p = sub.add_parser("plan")
    p.add_argument("--targets", nargs="+", default=["v5p-32", "v5e-64", "v6e-16"])
    p.add_argument("--context", type=int, default=4096)
    args = parser.parse_args()
    if args.what == "speed":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    speed(args) if args.what == "speed" else plan(args)


if __name__ == "__main__":
    main()
