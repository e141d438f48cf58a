"""Shared helpers of the bench scripts: machine load, peak RSS, one side per subprocess, the
measured fp32 matmul peak, and the model-FLOPs formula of a LLaDA train step.

Each bench runs each contender in its own Python subprocess (so that its peak RSS is its own) and
reads back one `RESULT {json}` line from it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

RESULT_TAG = "RESULT "


def load() -> str:
    """The 1/5/15-minute load averages and the core count, e.g. 'load 6.2 5.7 3.8 on 2 cores'."""
    one, five, fifteen = os.getloadavg()
    return f"load {one:.1f} {five:.1f} {fifteen:.1f} on {os.cpu_count()} cores"


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far: VmHWM, which belongs to this process's own
    memory (ru_maxrss would carry over the peak of the parent that spawned it); ru_maxrss (KiB)
    where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: dict) -> None:
    """Print a subprocess's result for `run_side` (adds its peak RSS and the load)."""
    result = dict(result, peak_rss_mib=peak_rss_mib(), load=load())
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_side(script: str, args: list[str], env: dict | None = None) -> dict:
    """Runs `python script *args` and returns the dict it `emit`ted; its stderr passes through.
    Raises RuntimeError with the tail of its output if it fails."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode or not lines:
        raise RuntimeError(f"{script} {' '.join(args)} failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len(RESULT_TAG):])
    result["wall_s"] = time.perf_counter() - start
    return result


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of a jitted jnp [n, n] @ [n, n] on this machine now."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def train_step_flops(*, d_model: int, n_layers: int, n_heads: int, n_kv_heads: int,
                     mlp_hidden: int, vocab: int, batch: int, seq_len: int,
                     head_tokens: int | None = None) -> dict[str, float]:
    """Model FLOPs of one forward + backward over batch * seq_len tokens (no recomputation):

      6 * tokens * N_blocks  +  6 * head_tokens * D * V  +  12 * n_layers * B * L^2 * D
      N_blocks = n_layers * (2 D^2 + 2 D * D_kv + 3 D * D_mlp)   (q, o; k, v; gate, up, down)

    6 = 2 (multiply-add) x 3 (forward, d input, d weight). The LM head [D, V] counts like any
    matmul, on the head_tokens positions the loss needs (default: every token; logits at
    prompt positions are work the objective does not need); the embedding is a gather (no
    FLOPs). Attention: QK^T and PV, 2 * 2 * L^2 * D per layer and row forward, x3 with the
    backward (bidirectional: the full L^2).
    """
    tokens = batch * seq_len
    d_kv = d_model // n_heads * n_kv_heads
    blocks = n_layers * (2 * d_model ** 2 + 2 * d_model * d_kv + 3 * d_model * mlp_hidden)
    head = 6 * (tokens if head_tokens is None else head_tokens) * d_model * vocab
    attention = 12 * n_layers * batch * seq_len ** 2 * d_model
    return {"blocks": 6 * tokens * blocks, "head": head, "attention": attention,
            "total": 6 * tokens * blocks + head + attention}
