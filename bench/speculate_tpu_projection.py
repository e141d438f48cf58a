#!/usr/bin/env python
"""Projected LLaDA-8B -> Llama-3.3-70B speculative speedup on TPU v5p and v6e, from the TPU
compiler's own costs of the programs one block runs.

    python bench/speculate_tpu_projection.py [--targets v5p-16 v6e-8] [--gamma 4] \
        [--trailing 4] [--steps 1] [--context 1024] [--tokens-per-call 1.47 2.3]

On this CPU, with the libtpu wheel (tpu_compile: abstract inputs, nothing allocated), for each
TPU slice it compiles, batch 1, both models bf16 on one mesh (heads over `tensor`):
  - the teacher's cached step at k = 1 (teacher-only decoding: one per token) and the cached
    verify call at k = γ + 1, over a cache holding `--context` tokens;
  - the drafter's block call with a prefix cache: the γ + trailing-mask window over `--context`
    cached keys (compiled as the cached extend; its causal mask inside the window costs what a
    bidirectional one does);
  - the drafter's full forward over context + window (no cache: what `speculate` runs today).
Each program is compiled at full depth (80 and 32 layers, as `bench/decode.py plan` does). The
bytes a step must move are the compiler's memory analysis of it: the arguments each chip holds
(its weight shard and KV cache), each read once per step. The FLOPs are counted from the shapes
(2 x matmul weights x positions + attention), per chip. A step's time is the roofline
max(bytes / HBM bandwidth, FLOPs / peak) per chip: bytes for the cached steps, FLOPs for the
drafter's full forward. The cost analysis's own FLOPs and "bytes accessed" are printed beside
them but not used: it counts a scanned layer stack once, and extrapolating 1- and 2-layer
unrolled compiles gave the verify step negative bytes (fusion choices differ with depth).
Not modelled: collective latency (2 all-reduces per layer over `tensor`), kernel launches, host
work and the vocabulary bridge (a gather): these are upper bounds on the speedup.

speedup(τ) = τ · t_teacher(k=1) / (t_verify(k=γ+1) + steps · t_draft), τ = tokens per target
call; under i.i.d. acceptance α per drafted token, τ = (1 - α^(γ+1)) / (1 - α).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llada_jax.model.config import ModelConfig  # noqa: E402
from llada_jax.model.llama_config import LLAMA_3_3_70B  # noqa: E402
from llada_jax.train import tpu_compile  # noqa: E402

# Per chip: HBM bandwidth (bytes/s) and dense bf16 peak (FLOP/s), Google Cloud's TPU v5p and
# v6e (Trillium) system-architecture pages.
CHIPS = {"v5p": (2765e9, 459e12), "v6e": (1640e9, 918e12)}
# Eight chips, tensor parallel over all of them (8 KV heads, one per chip): 70B's bf16 weights
# are 17.6 GB per chip, inside v6e's 32 GB and v5p's 95 GB.
MESH = {"data": 1, "fsdp": 1, "tensor": 8}
ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9)
TARGET_SPEEDUP = 2.5


def llada_8b() -> ModelConfig:
    """LLaDA-8B-Instruct's architecture (configs/llada_8b.py, DESIGN.md), bf16."""
    return ModelConfig(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32,
                       mlp_hidden_size=12288, vocab_size=126464, rope_theta=500000.0,
                       mask_token_id=126336, eos_token_id=126081, pad_token_id=126081,
                       max_sequence_length=4096, causal=False, param_dtype="bfloat16",
                       dtype="bfloat16")


def llama_70b() -> ModelConfig:
    return ModelConfig.from_hf_config(LLAMA_3_3_70B, param_dtype="bfloat16", dtype="bfloat16")


@dataclasses.dataclass(frozen=True)
class Cost:
    flops: float          # per chip, from the shapes
    bytes: float          # per chip: the compiled program's arguments (weights + cache)
    compiler_flops: float  # the cost analysis's, for reference (a scan's body counted once)
    compiler_bytes: float

    def seconds(self, chip: str) -> float:
        bandwidth, peak = CHIPS[chip]
        return max(self.bytes / bandwidth, self.flops / peak)


def shape_flops(cfg: ModelConfig, positions: int, keys: int) -> float:
    """All chips together: 2 x matmul weights (LM head included) per position, + QK^T and PV
    of each position over `keys` keys."""
    head_dim, d = cfg.d_model // cfg.n_heads, cfg.d_model
    attention = d * cfg.n_heads * head_dim * 2 + d * cfg.n_kv_heads * head_dim * 2
    matmul = cfg.n_layers * (attention + 3 * d * cfg.mlp_hidden_size) + cfg.vocab_size * d
    return positions * (2 * matmul + 4 * cfg.n_layers * cfg.n_heads * head_dim * keys)


def cost(report, cfg: ModelConfig, positions: int, keys: int) -> Cost:
    chips = MESH["tensor"]
    return Cost(shape_flops(cfg, positions, keys) / chips, report.argument_bytes,
                report.flops_per_device, report.bytes_accessed)


def program_costs(target: str, gamma: int, trailing: int, context: int) -> dict[str, Cost]:
    teacher, drafter = llama_70b(), llada_8b()
    cache = context + 128  # slots allocated: the context and room for the block

    def step(k):
        return lambda cfg: tpu_compile.compile_decode_step(
            cfg, target, MESH, batch_size=1, max_length=cache, tokens_per_step=k)

    window = gamma + trailing
    full = context + window
    return {
        "teacher k=1": cost(step(1)(teacher), teacher, 1, context),
        f"teacher verify k={gamma + 1}": cost(step(gamma + 1)(teacher), teacher, gamma + 1, context),
        f"drafter window {window}, prefix cache": cost(step(window)(drafter), drafter, window,
                                                       context + window),
        f"drafter full forward {full}": cost(tpu_compile.compile_forward(
            drafter, target, MESH, batch_size=1, length=full), drafter, full, full),
    }


def tokens_per_call(alpha: float, gamma: int) -> float:
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def alpha_for(tau: float, gamma: int) -> float | None:
    """The i.i.d. acceptance that gives τ tokens per call (bisection), None past γ + 1."""
    if tau >= gamma + 1:
        return None
    low, high = 0.0, 1.0 - 1e-12
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if tokens_per_call(mid, gamma) < tau else (low, mid)
    return low


def report(target: str, costs: dict[str, Cost], args) -> None:
    chip = target.split("-")[0]
    bandwidth, peak = CHIPS[chip]
    names = list(costs)
    t = {name: cost.seconds(chip) for name, cost in costs.items()}
    k1, verify, window, full = (t[n] for n in names)
    print(f"\n## {target}: {MESH['tensor']} chips, tensor parallel; {bandwidth / 1e9:.0f} GB/s HBM "
          f"and {peak / 1e12:.0f} TFLOP/s bf16 per chip; context {args.context}, γ {args.gamma}, "
          f"{args.trailing} trailing masks, {args.steps} denoising step(s)\n")
    print("program | GFLOP / chip (shapes) | GB / chip (weights + cache) | roofline ms | "
          "cost analysis: GFLOP, GB accessed (scan body once)")
    print("---|---|---|---|---")
    for name, c in costs.items():
        print(f"{name} | {c.flops / 1e9:.1f} | {c.bytes / 1e9:.2f} | {1e3 * t[name]:.3f} | "
              f"{c.compiler_flops / 1e9:.1f}, {c.compiler_bytes / 1e9:.2f}")
    block = {"prefix cache": verify + args.steps * window, "no cache": verify + args.steps * full}
    print("\nacceptance α | tokens/call τ | speedup, drafter with prefix cache | "
          "speedup, drafter without cache")
    print("---|---|---|---")
    rows = [(f"{a:.2f}", tokens_per_call(a, args.gamma)) for a in ALPHAS]
    rows += [("given", tau) for tau in args.tokens_per_call]
    for label, tau in rows:
        print(f"{label} | {tau:.2f} | {tau * k1 / block['prefix cache']:.2f}x | "
              f"{tau * k1 / block['no cache']:.2f}x")
    for name, seconds in block.items():
        tau = TARGET_SPEEDUP * seconds / k1
        alpha = alpha_for(tau, args.gamma)
        need = (f"α ≥ {alpha:.3f}" if alpha is not None
                else f"more than γ + 1 = {args.gamma + 1}: out of reach at this γ")
        print(f"{TARGET_SPEEDUP}x needs τ ≥ {tau:.2f} tokens per call ({name}): {need}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", nargs="+", default=["v5p-16", "v6e-8"])
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--trailing", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--tokens-per-call", type=float, nargs="*", default=[],
                        help="tokens per target call to project too (e.g. measured ones)")
    args = parser.parse_args()
    for key, value in tpu_compile.LIBTPU_ENV.items():
        os.environ.setdefault(key, value)
    print("LLaDA-8B drafter -> Llama-3.3-70B teacher, batch 1, bf16 weights and KV cache; "
          "bytes per chip from the TPU compiler's memory analysis of each full-depth program")
    for target in args.targets:
        started = time.perf_counter()
        costs = program_costs(target, args.gamma, args.trailing, args.context)
        report(target, costs, args)
        print(f"\n({len(costs)} compiles in {time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
