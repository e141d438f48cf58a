"""Loader: examples/s, tokens/s and bytes/s of the grain loader with packing, vs the tokens/s the
train step consumes.

Builds a dataset with the real `llada-jax preprocess` from a generated seed-format file (or uses
--data-dir), then times `data_pipeline.loader.make_loader` (shuffle, first-fit packing, batching,
prefetch; one host) at two batch shapes:
- the tiny config's (B=8, L=128), against the tiny config's own train step measured here on the
  same dataset (the fastest consumer);
- bench/train_step_cpu.py's (B=2, L=512), against --step-tokens-per-s (its measured figure).

    python bench/loader.py [--batches 200] [--step-tokens-per-s 145]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import benchlib
import seed_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"tiny": (8, 128), "d512": (2, 512)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", help="an existing `llada-jax preprocess` output")
    p.add_argument("--size-mb", type=float, default=96, help="generated input (no --data-dir)")
    p.add_argument("--batches", type=int, default=200, help="timed batches per shape")
    p.add_argument("--step-tokens-per-s", type=float, default=145.0,
                   help="our train step's tokens/s from bench/train_step_cpu.py (d=512)")
    p.add_argument("--tiny-steps", type=int, default=20)
    p.add_argument("--side", help=argparse.SUPPRESS)  # "loader:SHAPE" or "tiny", + --data-dir
    return p.parse_args(argv)


def time_loader(data_dir: str, batch: int, seq_len: int, n: int) -> dict:
    from data_pipeline.loader import make_loader

    it = make_loader(data_dir, "train", batch_size=batch, seq_len=seq_len, seed=0,
                     shard_index=0, shard_count=1)
    for _ in range(3):  # warm-up: open the shards, fill the packing bins and the prefetch
        next(it)
    start = time.perf_counter()
    batches = [next(it) for _ in range(n)]
    seconds = time.perf_counter() - start
    segments = [b["segment_ids"] for b in batches]
    examples = sum(len(np.unique(row[row > 0])) for seg in segments for row in seg)
    tokens = sum(int((seg > 0).sum()) for seg in segments)
    nbytes = sum(v.nbytes for b in batches for v in b.values())
    return {"examples_per_s": examples / seconds, "tokens_per_s": tokens / seconds,
            "bytes_per_s": nbytes / seconds, "fill": tokens / (n * batch * seq_len)}


def time_tiny_step(data_dir: str, steps: int) -> dict:
    """The tiny config's jitted train step on batches of this dataset: tokens/s."""
    import jax

    from llada_jax.train import config as train_config

    from llada_jax.train import trainer as trainer_lib

    config = train_config.load_config(os.path.join(REPO, "configs", "tiny.py"),
                                   [f"--config.data.dir={data_dir}"])
    with tempfile.TemporaryDirectory() as workdir:
        trainer = trainer_lib.Trainer(config, workdir, progress=False)
        state = trainer.initial_state()
        it = trainer.make_iterator("train", shuffle=True, num_epochs=None)
        batches = [trainer.to_global(next(it)) for _ in range(steps + 1)]
        rng = jax.random.key(0)
        state, _ = trainer.step_fn(state, batches[0], rng)  # compile
        jax.block_until_ready(state)
        tokens, start = 0, time.perf_counter()
        for b in batches[1:]:
            state, metrics = trainer.step_fn(state, b, rng)
            tokens += float(metrics["tokens"])
        jax.block_until_ready(state)
    return {"tokens_per_s": tokens / (time.perf_counter() - start)}


def build_dataset(work: str, size_mb: float) -> str:
    teacher_dir, student_dir = seed_data.make_tokenizers(work, 2048)
    src = os.path.join(work, "seed.json")
    gen = seed_data.write_seed_file(src, teacher_dir, target_bytes=int(size_mb * 2**20))
    out = os.path.join(work, "data")
    subprocess.run([sys.executable, "-m", "llada_jax", "preprocess", "--input", src, "--out",
                    out, "--student-tokenizer", student_dir, "--teacher-tokenizer", teacher_dir,
                    "--max-length", "512", "--top-k", "64", "--validation-fraction", "0.05"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"dataset: {gen['examples']} generated examples -> {out} (top-k 64)")
    return out


def main() -> None:
    args = parse_args()
    if args.side:
        if args.side == "tiny":
            benchlib.emit(time_tiny_step(args.data_dir, args.tiny_steps))
        else:
            benchlib.emit(time_loader(args.data_dir, *SHAPES[args.side.split(":")[1]],
                                      args.batches))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or build_dataset(tmp, args.size_mb)
        print(f"setup: grain loader, shuffle + first-fit packing + batch + prefetch 2, 1 host, "
              f"{args.batches} timed batches after 3; {benchlib.load()}")
        common = ["--data-dir", data_dir, "--batches", str(args.batches),
                  "--tiny-steps", str(args.tiny_steps)]
        step = {"tiny": benchlib.run_side(__file__, common + ["--side", "tiny"])["tokens_per_s"],
                "d512": args.step_tokens_per_s}
        for shape, (batch, seq_len) in SHAPES.items():
            r = benchlib.run_side(__file__, common + ["--side", f"loader:{shape}"])
            source = ("tiny config train step measured now" if shape == "tiny"
                      else "--step-tokens-per-s, from bench/train_step_cpu.py")
            print(f"[B={batch}, L={seq_len}] loader {r['examples_per_s']:.0f} examples/s, "
                  f"{r['tokens_per_s']:.0f} tokens/s, {r['bytes_per_s'] / 2**20:.1f} MiB/s of "
                  f"batches (rows {r['fill']:.0%} filled); train step {step[shape]:.0f} "
                  f"tokens/s ({source}) -> headroom {r['tokens_per_s'] / step[shape]:.0f}x "
                  f"(goal >= 10x); {r['load']}")


if __name__ == "__main__":
    main()
