"""GPU train step: step time, tokens/s and MFU of a ~1B-parameter LLaDA at L = 2048, bf16.

One prepared run for a lent accelerator (a few minutes): the step `llada-jax train` compiles
(`train_step.jit_train_step`, shardings and donated state, on one device) with fp32 params and
AdamW state, bf16 compute, attention_impl "dot_product_attention" (cuDNN on GPU), the tiny
config's KL loss (sequence chunks), a synthetic batch (`data_pipeline.batch.synthetic`: random
tokens, random top-k teacher). MFU = model FLOPs (benchlib.train_step_flops, no recomputation counted)
/ step time / the device's dense bf16 peak (table below; CPU: the measured fp32 matmul peak).

    python bench/gpu_step.py [--batch 2] [--steps 10]     # on the GPU machine
    python bench/gpu_step.py --smoke                       # tiny shapes, any backend (CPU)
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import benchlib
from data_pipeline import batch as batch_lib
from llada_jax import sharding
from llada_jax.model.config import ModelConfig
from llada_jax.train import config as train_config
from llada_jax.train import train_step

REPO = pathlib.Path(__file__).resolve().parents[1]

# Dense bf16 peak FLOP/s by jax device_kind prefix (vendor datasheets, no sparsity).
PEAK_BF16 = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
             "NVIDIA L4": 121e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v4": 275e12,
             "TPU v6 lite": 918e12}
ONE_B = dict(d_model=2048, n_layers=16, n_heads=16, mlp=5504, vocab=126464, seq_len=2048)
SMOKE = dict(d_model=64, n_layers=2, n_heads=4, mlp=128, vocab=1024, seq_len=128)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script on CPU)")
    p.add_argument("--batch", type=int, default=2,
                   help="rows of 2048 tokens (B=2: XLA:CPU plans 43 GiB temp + 15 GiB state)")
    p.add_argument("--steps", type=int, default=10, help="timed steps after 2 warm-up steps")
    p.add_argument("--remat", default="none", help="model.remat_policy: none | full | dots")
    p.add_argument("--top-k", type=int, default=64)
    return p.parse_args(argv)


def device_peak(device) -> tuple[float, str]:
    kind = device.device_kind
    for prefix, peak in PEAK_BF16.items():
        if kind.startswith(prefix):
            return peak, f"{kind}: datasheet dense bf16 {peak / 1e12:.0f} TFLOP/s"
    peak = benchlib.matmul_peak_gflops() * 1e9
    return peak, f"{kind}: measured fp32 matmul {peak / 1e9:.0f} GFLOP/s (no table entry)"


def main() -> None:
    args = parse_args()
    shape = SMOKE if args.smoke else ONE_B
    device = jax.devices()[0]
    peak, peak_note = device_peak(device)
    model_cfg = ModelConfig(
        d_model=shape["d_model"], n_heads=shape["n_heads"], n_layers=shape["n_layers"],
        mlp_hidden_size=shape["mlp"], vocab_size=shape["vocab"],
        mask_token_id=shape["vocab"] - 1, max_sequence_length=shape["seq_len"],
        dtype="bfloat16", param_dtype="float32", remat_policy=args.remat,
        attention_impl="dot_product_attention")
    config = train_config.load_config(str(REPO / "configs" / "tiny.py"), [])
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, [device])
    jitted = train_step.jit_train_step(config, model_cfg, mesh, sharding.DEFAULT_RULES,
                                       total_steps=1000)
    state = jitted.random_state(0)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    batch = batch_lib.synthetic(np.random.default_rng(0), (args.batch, shape["seq_len"], args.top_k),
                                vocab_size=shape["vocab"], exclude_id=shape["vocab"] - 1)
    batch = {k: jax.device_put(v, jitted.batch_sharding) for k, v in batch.items()}
    print(f"setup: {device.platform} {peak_note}; LLaDA d={shape['d_model']}, "
          f"{shape['n_layers']} layers, {shape['n_heads']} heads, MLP {shape['mlp']}, "
          f"V={shape['vocab']}: {n_params / 1e9:.2f} B params (fp32, AdamW fp32), bf16 compute, "
          f"attention dot_product_attention, remat {args.remat}; B={args.batch}, "
          f"L={shape['seq_len']}, top-k {args.top_k}; {benchlib.load()}")
    rng = jax.random.key(0)
    start = time.perf_counter()
    with jax.set_mesh(mesh), sharding.rules_context(sharding.DEFAULT_RULES):
        step = jitted.step.lower(state, batch, rng).compile()
    plan = step.memory_analysis()
    if plan is not None:
        print(f"compiled in {time.perf_counter() - start:.1f} s; planned device memory: state + "
              f"batch {plan.argument_size_in_bytes / 2**30:.1f} GiB, temp "
              f"{plan.temp_size_in_bytes / 2**30:.1f} GiB")
    for _ in range(2):
        state, metrics = step(state, batch, rng)
    jax.block_until_ready(state)
    print(f"compile + 2 warm-up steps: {time.perf_counter() - start:.1f} s; loss "
          f"{float(metrics['loss_sum'] / metrics['loss_count']):.4f}")
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch, rng)
    jax.block_until_ready(state)
    step_s = (time.perf_counter() - start) / args.steps
    flops = benchlib.train_step_flops(
        d_model=shape["d_model"], n_layers=shape["n_layers"], n_heads=shape["n_heads"],
        n_kv_heads=shape["n_heads"], mlp_hidden=shape["mlp"], vocab=shape["vocab"],
        batch=args.batch, seq_len=shape["seq_len"])
    tokens = args.batch * shape["seq_len"]
    memory = (device.memory_stats() or {}).get("peak_bytes_in_use")
    print(f"step {step_s * 1e3:.1f} ms (mean of {args.steps}) -> {tokens / step_s:.0f} tokens/s;"
          f" model FLOPs {flops['total'] / 1e12:.2f} TFLOP per step -> "
          f"{flops['total'] / step_s / 1e12:.1f} TFLOP/s, MFU {flops['total'] / step_s / peak:.1%}"
          + (f"; peak device memory {memory / 2**30:.1f} GiB" if memory else ""))
    assert jnp.isfinite(metrics["loss_sum"]), "non-finite loss"


if __name__ == "__main__":
    main()
