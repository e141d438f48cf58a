"""8B memory plan from the TPU compiler: the largest per-chip batch at seq 4096 that fits in HBM.

Compiles the real LLaDA-8B train step (configs/llada_8b.py: splash attention, chunked KL,
AdamW, FSDP over all chips, abstract inputs) for each TPU slice on this CPU machine (needs the
libtpu wheel) and prints a markdown table of the compiler's per-device figures:

    python bench/tpu_memory_plan.py                       # all variants, ~4 compiles each
    python bench/tpu_memory_plan.py --variants v5e_64 --remat full dots --tiles 2048 4096
    python bench/tpu_memory_plan.py --variants v5p_32 --batches 8 16     # no search

Search per variant and (remat, loss vocabulary tile): start at the per-chip batch recorded in
configs/llada_8b.py, double while it fits, halve while it does not; the last fitting batch is
the answer. FLOPs per device per step are the cost analysis's, extrapolated over layers
(tpu_compile.flops_per_step; the splash kernel's own FLOPs are not in it). One 8B compile takes
minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import time

from llada_jax.train import tpu_compile

ROOT = pathlib.Path(__file__).resolve().parents[1]
# LLaDA-8B's vocabulary (DESIGN.md); the architecture is in the config file.
VOCAB_SIZE, MASK_TOKEN_ID, TOP_K = 126464, 126336, 64
# config variant -> TPU slice (tpu_compile.TARGETS)
SLICES = {"v5e_64": "v5e-64", "v5p_32": "v5p-32", "v4_32": "v4-32", "v6e_16": "v6e-16"}


def load_variants_module():
    spec = importlib.util.spec_from_file_location("llada_8b", ROOT / "configs" / "llada_8b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_config(module, variant: str, per_chip_batch: int, remat: str, tile: int):
    config = module.get_config(variant)
    chips = config.mesh.data * config.mesh.fsdp * config.mesh.tensor
    config.data.global_batch_size = per_chip_batch * chips
    config.model.update(remat_policy=remat, init="random")
    config.loss.vocab_tile = tile
    return config


def try_batch(module, variant: str, batch: int, remat: str, tile: int, rows: list) -> bool:
    """Compiles one setting, appends its row (a report, or the compiler's out-of-HBM message)."""
    started = time.perf_counter()
    try:
        result = tpu_compile.compile_train_step(
            step_config(module, variant, batch, remat, tile), SLICES[variant],
            vocab_size=VOCAB_SIZE, mask_token_id=MASK_TOKEN_ID, top_k=TOP_K)
    except tpu_compile.OutOfHbm as err:
        result = err
    fits = not isinstance(result, Exception) and result.fits
    rows.append((variant, batch, remat, tile, result))
    print(f"# {variant} batch {batch} {remat} tile {tile}: fits={fits} "
          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return fits


def largest_fitting_batch(module, variant: str, remat: str, tile: int, rows: list,
                          batches: list[int] | None) -> int | None:
    """Doubling/halving search from the recorded batch (or exactly `batches`)."""
    tried: dict[int, bool] = {}
    if batches:
        tried = {b: try_batch(module, variant, b, remat, tile, rows) for b in batches}
    batch = module.VARIANTS[variant][1]
    while not batches and batch >= 1 and batch not in tried:
        tried[batch] = try_batch(module, variant, batch, remat, tile, rows)
        batch = batch * 2 if tried[batch] else batch // 2
    fitting = [b for b, fits in tried.items() if fits]
    return max(fitting) if fitting else None


def matmul_params(config) -> int:
    """N of the 6 * N * tokens yardstick: every weight matrix but the embedding table."""
    m = config.model
    head_dim = m.d_model // m.n_heads
    attention = m.d_model * head_dim * (2 * m.n_heads + 2 * m.n_kv_heads)
    return m.n_layers * (attention + 3 * m.d_model * m.mlp_hidden_size) + m.d_model * VOCAB_SIZE


def gib(n: int) -> str:
    return f"{n / tpu_compile.GIB:.2f}"


def print_tables(rows: list, best: dict) -> None:
    print("| slice | per-chip batch | remat | loss vocab tile | arguments GiB | outputs GiB (fresh) "
          "| temporaries GiB | total GiB | HBM GiB | fits |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for variant, batch, remat, tile, r in rows:
        if isinstance(r, Exception):
            print(f"| {SLICES[variant]} | {batch} | {remat} | {tile} | compiler: out of HBM, "
                  f"{r} | | | | | no |")
            continue
        print(f"| {SLICES[variant]} | {batch} | {remat} | {tile} | {gib(r.argument_bytes)} | "
              f"{gib(r.output_bytes - r.alias_bytes)} | {gib(r.temp_bytes)} | "
              f"{gib(r.total_bytes)} | {gib(r.hbm_bytes)} | {'yes' if r.fits else 'no'} |")
    print()
    print("| slice | config | mesh | per-chip batch | global batch | remat | loss vocab tile "
          "| TFLOP per chip per step (cost analysis) | 6·N·tokens per chip, TFLOP "
          "| tokens per step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for variant, (batch, remat, tile, flops, mesh, n_params) in best.items():
        chips = mesh["data"] * mesh["fsdp"] * mesh["tensor"]
        mesh_text = " ".join(f"{k}={v}" for k, v in mesh.items() if v > 1)
        print(f"| {SLICES[variant]} | llada_8b.py:{variant} | {mesh_text} | {batch} | "
              f"{batch * chips} | {remat} | {tile} | {flops / 1e12:.1f} | "
              f"{6 * n_params * batch * 4096 / 1e12:.1f} | {batch * chips * 4096} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(SLICES), choices=list(SLICES))
    parser.add_argument("--remat", nargs="+", default=["full"], help="policies to search")
    parser.add_argument("--tiles", nargs="+", type=int, default=[4096],
                        help="loss vocabulary tiles (loss.vocab_tile)")
    parser.add_argument("--batches", nargs="+", type=int,
                        help="compile exactly these per-chip batches (no search)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOPs compiles")
    args = parser.parse_args(argv)
    module = load_variants_module()
    rows, best = [], {}
    for variant in args.variants:
        found = []
        for remat in args.remat:
            for tile in args.tiles:
                batch = largest_fitting_batch(module, variant, remat, tile, rows, args.batches)
                if batch is not None:
                    found.append((batch, remat, tile))
        if not found:
            continue
        # Largest batch; among equals, the order given on the command line (cheapest first).
        batch, remat, tile = max(found, key=lambda f: f[0])
        config = step_config(module, variant, batch, remat, tile)
        flops = 0.0 if args.no_flops else tpu_compile.flops_per_step(
            config, SLICES[variant], vocab_size=VOCAB_SIZE, mask_token_id=MASK_TOKEN_ID,
            top_k=TOP_K)
        best[variant] = (batch, remat, tile, flops, dict(config.mesh), matmul_params(config))
    print_tables(rows, best)
    return 0


if __name__ == "__main__":
    sys.exit(main())
