"""Train step on CPU: ours vs a PyTorch re-implementation of the original training loop.

Same model config, data and batch on both sides, fp32 on CPU, each side in its own subprocess:
- ours: the step `llada-jax train` compiles (`train_step.jit_train_step`: diffusion masking,
  forward with stacked + scanned layers, sparse top-k KL with tail bucket through the LM head in
  sequence chunks, clipped AdamW; jitted with its shardings and the state donated), on one
  device; the teacher as top-k ids + log-probs [B, L, k] (the batch of data_pipeline/batch.py);
- original: the original trainer's loop in PyTorch: the teacher as a dense float32 [B, L, V]
  tensor (prompt rows zero), the same diffusion masking, logits [B, L, V] from a LLaDA forward
  (tests/torch_reference.py), KL(softmax(teacher / T) || softmax(logits / T)) summed over the
  vocabulary on every response position / number of response positions, torch AdamW with warmup.
Prints tokens/s (B * L tokens per step / median step time), peak RSS, the speedup, and MFU
against this machine's jnp fp32 matmul peak measured in the same run (formula in
benchlib.train_step_flops; the LM head counted on the response positions, which the loss needs).

    python bench/train_step_cpu.py [--vocab 126464] [--steps 2] [--sides ours,original]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import numpy as np

import benchlib

REPO = pathlib.Path(__file__).resolve().parents[1]
ORIGINAL_LR, ORIGINAL_WD, ORIGINAL_WARMUP, MASK_EPS = 2.5e-5, 0.1, 50, 1e-3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=126464)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--mlp", type=int, default=1536, help="MLP hidden size (LLaDA-8B: 3 x d)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (after 1 warm-up)")
    p.add_argument("--sides", default="ours,original")
    p.add_argument("--chunk-axis", default="sequence",
                   help="our loss.chunk_axis: sequence (fewest FLOPs) | vocab (least memory)")
    p.add_argument("--chunk-size", type=int, default=256, help="our loss.chunk_size (sequence)")
    p.add_argument("--vocab-tile", type=int, default=4096, help="our loss.vocab_tile (vocab)")
    p.add_argument("--remat", default="none", help="our model.remat_policy: none | full | dots")
    p.add_argument("--no-scan", action="store_true", help="our layers as a Python loop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--side", help=argparse.SUPPRESS)  # set in the subprocesses
    return p.parse_args(argv)


def prompt_length(args) -> int:
    """The first L / 4 tokens of every row are prompt (no teacher target, not in the loss)."""
    return args.seq_len // 4


def synthetic_tokens(args) -> tuple[np.ndarray, int]:
    """Student tokens int32 [B, L] (never the mask id V - 1) and the prompt length (L / 4)."""
    rng = np.random.default_rng(args.seed)
    return rng.integers(0, args.vocab - 1, (args.batch, args.seq_len)).astype(np.int32), \
        prompt_length(args)


def teacher_logits(args, row: int, pos: int) -> np.ndarray:
    """The teacher's full logits [V] float32 at response position (row, pos), same on both
    sides and made one position at a time (so our side never holds [B, L, V])."""
    rng = np.random.default_rng([args.seed, row, pos])
    return 3.0 * rng.standard_normal(args.vocab, dtype=np.float32)


def our_batch(args) -> dict[str, np.ndarray]:
    """The loader's batch (data_pipeline/batch.py), one example per row, with the tokens and
    the teacher of the original's side: top-k ids + log-probs (over the full vocab)."""
    from data_pipeline import batch as batch_lib

    tokens, prompt_len = synthetic_tokens(args)
    b, seq, k = args.batch, args.seq_len, args.top_k
    batch = batch_lib.synthetic(np.random.default_rng(args.seed), (b, seq, k),
                                vocab_size=args.vocab, segments=[(prompt_len, seq - prompt_len)])
    batch["tokens"] = tokens
    for row in range(b):
        for pos in range(prompt_len, seq):
            z = teacher_logits(args, row, pos).astype(np.float64)
            top = np.argpartition(-z, k)[:k]
            top = top[np.argsort(-z[top])]
            batch["teacher_ids"][row, pos] = top
            batch["teacher_logprobs"][row, pos] = (z[top] - np.log(np.exp(z - z.max()).sum())
                                                   - z.max())
    return batch


def run_ours(args) -> dict:
    import jax

    from llada_jax import sharding
    from llada_jax.model.config import ModelConfig
    from llada_jax.train import config as train_config
    from llada_jax.train import train_step

    overrides = {"optim.lr": ORIGINAL_LR, "optim.weight_decay": ORIGINAL_WD,
                 "optim.warmup_steps": ORIGINAL_WARMUP, "loss.mask_mode": "original",
                 "loss.mask_eps": MASK_EPS, "model.dtype": "float32",
                 "loss.chunk_axis": args.chunk_axis, "loss.chunk_size": args.chunk_size,
                 "loss.vocab_tile": args.vocab_tile}
    config = train_config.load_config(str(REPO / "configs" / "tiny.py"),
                                   [f"--config.{k}={v}" for k, v in overrides.items()])
    model_cfg = ModelConfig(
        d_model=args.d_model, n_heads=args.heads, n_layers=args.layers,
        mlp_hidden_size=args.mlp, vocab_size=args.vocab, mask_token_id=args.vocab - 1,
        max_sequence_length=args.seq_len, dtype="float32", remat_policy=args.remat,
        scan_layers=not args.no_scan)
    # The program `llada-jax train` compiles (shardings, donation), on one device.
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    jitted = train_step.jit_train_step(config, model_cfg, mesh, sharding.DEFAULT_RULES,
                                       total_steps=1000)
    state = jitted.random_state(args.seed)
    batch = our_batch(args)
    rng = jax.random.key(args.seed)
    peaks = [benchlib.matmul_peak_gflops()]
    times, losses = [], []
    with jax.set_mesh(mesh), sharding.rules_context(sharding.DEFAULT_RULES):
        batch = {k: jax.device_put(v, jitted.batch_sharding) for k, v in batch.items()}
        for i in range(args.steps + 1):
            start = time.perf_counter()
            state, metrics = jitted.step(state, batch, rng)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - start)
            losses.append(float(metrics["loss_sum"] / metrics["loss_count"]))
    peaks.append(benchlib.matmul_peak_gflops())
    return {"step_s": times[1:], "compile_and_first_step_s": times[0], "loss": losses,
            "matmul_peak_gflops": peaks, "config": {"loss": config.loss.to_dict(),
                                                    "remat": args.remat, "scan": not args.no_scan}}


def torch_state(args, torch) -> dict:
    """Random LLaDA weights in the HF state-dict layout (torch Linear [out, in]), as Parameters."""
    d, f, v = args.d_model, args.mlp, args.vocab
    shapes = {"wte.weight": (v, d), "ln_f.weight": (d,), "ff_out.weight": (v, d)}
    for i in range(args.layers):
        shapes.update({f"blocks.{i}.{name}.weight": shape for name, shape in (
            ("q_proj", (d, d)), ("k_proj", (d, d)), ("v_proj", (d, d)), ("attn_out", (d, d)),
            ("ff_proj", (f, d)), ("up_proj", (f, d)), ("ff_out", (d, f)),
            ("attn_norm", (d,)), ("ff_norm", (d,)))})
    gen = torch.Generator().manual_seed(args.seed)
    return {"model.transformer." + name: torch.nn.Parameter(
        torch.ones(shape) if len(shape) == 1 else 0.02 * torch.randn(shape, generator=gen))
        for name, shape in shapes.items()}


def run_original(args) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO))
    from tests import torch_reference

    torch.set_num_threads(os.cpu_count())
    cfg = {"d_model": args.d_model, "n_heads": args.heads, "n_kv_heads": args.heads,
           "n_layers": args.layers, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "weight_tying": False}
    state = torch_state(args, torch)
    tokens_np, prompt_len = synthetic_tokens(args)
    tokens = torch.from_numpy(tokens_np).long()
    # The original's preprocessed layout: float32 [L, V] per example, prompt rows zero.
    teacher = torch.zeros(args.batch, args.seq_len, args.vocab)
    for row in range(args.batch):
        for pos in range(prompt_len, args.seq_len):
            teacher[row, pos] = torch.from_numpy(teacher_logits(args, row, pos))
    response = torch.arange(args.seq_len)[None].expand(args.batch, -1) >= prompt_len
    optimizer = torch.optim.AdamW(state.values(), lr=ORIGINAL_LR, weight_decay=ORIGINAL_WD)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / ORIGINAL_WARMUP))
    gen = torch.Generator().manual_seed(args.seed)
    temperature = 1.0
    times, losses = [], []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        t = torch.rand(args.batch, 1, generator=gen)
        p_mask = (1 - MASK_EPS) * t + MASK_EPS
        masked = response & (torch.rand(tokens.shape, generator=gen) < p_mask)
        noisy = torch.where(masked, args.vocab - 1, tokens)
        logits = torch_reference.forward(state, cfg, noisy)
        student_logq = F.log_softmax(logits / temperature, dim=-1)
        teacher_p = F.softmax(teacher / temperature, dim=-1)
        kl = F.kl_div(student_logq, teacher_p, reduction="none").sum(-1)
        loss = (kl * response).sum() / response.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    return {"step_s": times[1:], "compile_and_first_step_s": times[0], "loss": losses}


def report(args, results: dict) -> None:
    tokens = args.batch * args.seq_len
    flops = benchlib.train_step_flops(
        d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
        mlp_hidden=args.mlp, vocab=args.vocab, batch=args.batch, seq_len=args.seq_len,
        head_tokens=args.batch * (args.seq_len - prompt_length(args)))
    print(f"model FLOPs per step: {flops['total'] / 1e9:.1f} GFLOP (blocks "
          f"{flops['blocks'] / 1e9:.1f}, LM head {flops['head'] / 1e9:.1f}, attention "
          f"{flops['attention'] / 1e9:.1f}) = 6 * tokens * N_blocks + 6 * loss positions * "
          "D*V + 12 * layers * B * L^2 * D (the loss needs no logits at prompt positions)")
    peak = max(results["ours"]["matmul_peak_gflops"]) if "ours" in results else None
    if peak:
        print("jnp fp32 matmul peak (2048^3, best of 5) measured before/after our steps: "
              + ", ".join(f"{g:.1f}" for g in results["ours"]["matmul_peak_gflops"])
              + f" GFLOP/s; MFU uses the higher, {peak:.1f}")
    rate = {}
    for side, r in results.items():
        step_s = statistics.median(r["step_s"])
        rate[side] = tokens / step_s
        mfu = f"; MFU {flops['total'] / step_s / 1e9 / peak:.1%}" if peak else ""
        print(f"[{side}] step {step_s:.2f} s (median of {len(r['step_s'])}: "
              + ", ".join(f"{s:.2f}" for s in r["step_s"])
              + f"; first step incl. compile {r['compile_and_first_step_s']:.1f} s) -> "
              f"{rate[side]:.0f} tokens/s; peak RSS {r['peak_rss_mib'] / 1024:.2f} GiB; "
              f"losses {', '.join(f'{x:.3f}' for x in r['loss'])}{mfu}; {r['load']}")
    if len(rate) == 2:
        speedup = rate["ours"] / rate["original"]
        print(f"speedup ours / original: {speedup:.2f}x tokens/s (goal >= 2x); peak RSS "
              f"original / ours: {results['original']['peak_rss_mib'] / results['ours']['peak_rss_mib']:.2f}")


def main() -> None:
    args = parse_args()
    if args.side:
        benchlib.emit({"ours": run_ours, "original": run_original}[args.side](args))
        return
    print(f"setup: LLaDA d={args.d_model}, {args.layers} layers, {args.heads} heads, MLP "
          f"{args.mlp}, V={args.vocab}; B={args.batch}, L={args.seq_len} (prompt = first "
          f"{prompt_length(args)}), all rows full; teacher top-k={args.top_k} for ours, dense "
          f"[B, L, V] fp32 for the original; fp32 params and compute; remat {args.remat}, scan "
          f"{not args.no_scan}; {args.steps} timed steps after 1 warm-up; {benchlib.load()}")
    results = {}
    for side in args.sides.split(","):
        results[side] = benchlib.run_side(__file__, sys.argv[1:] + ["--side", side])
    report(args, results)


if __name__ == "__main__":
    main()
