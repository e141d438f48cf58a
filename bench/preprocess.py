"""Preprocessing: `llada-jax preprocess` vs the original's approach, on generated seed-format
files with full logits at two sizes (examples/s, input MB/s, peak RSS).

Ours: the real preprocess (streaming reader, W spawned workers, top-k 64 targets, ArrayRecord
shards). Original: bench/seed_data.original_preprocess (json.load of the whole file, a dense
float32 [L, V_teacher] tensor per example, torch.save of the list). Each run is its own
subprocess; peak RSS is ru_maxrss of the main process and of its largest worker (the workers
run at the same time, so main + W x worker bounds the total).

For each input it first measures, on the input's first record, the bare parse rate of the kept
parsers (simdjson is what fast_logits uses; orjson, msgspec and json for comparison), so the
per-worker rate of ours (input MiB/s / workers) can be set against it (goal: >= 70% at 128256).

    python bench/preprocess.py [--sizes-mb 1024,2048] [--teacher-vocab 32000] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time

import benchlib
import seed_data


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mb", default="1024,2048", help="input file sizes, comma-separated")
    p.add_argument("--teacher-vocab", type=int, default=32000,
                   help="full_logits length (32000: about 250 KB of JSON per token)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--original-max-mb", type=float, default=2048,
                   help="skip the original on larger files (its RSS grows with the file)")
    p.add_argument("--workdir", help="keep the files here (default: a temporary directory)")
    p.add_argument("--side", nargs=4, help=argparse.SUPPRESS)  # side src out tok_dir
    return p.parse_args(argv)


def run_side(args) -> dict:
    side, src, out, tok_dir = args.side
    teacher_dir, student_dir = (os.path.join(tok_dir, n) for n in ("teacher", "student"))
    start = time.perf_counter()
    if side == "ours":
        from data_pipeline.convert import Options
        from data_pipeline.preprocess import preprocess

        report = preprocess([src], out, Options(student_dir, teacher_dir, args.max_length,
                                                args.top_k, None, "skip", 0.05),
                            workers=args.workers, overwrite=True)
        result = {"examples": report["read"], "written": report["written"],
                  "convert_seconds": report["seconds"]}
    else:
        result = seed_data.original_preprocess(src, out, student_dir,
                                               max_length=args.max_length,
                                               vocab=args.teacher_vocab)
    result["seconds"] = time.perf_counter() - start
    result["worker_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result


def bare_parse_rates(text: bytes, repeats: int = 5) -> dict[str, float]:
    """MiB/s of each kept parser on one record's JSON text (best of `repeats`): simdjson's full
    parse (the tape: every number parsed and checked), orjson's and msgspec's Python objects."""
    import json

    import msgspec
    import orjson
    import simdjson

    parser = simdjson.Parser()
    parsers = {
        "simdjson": lambda: parser.parse(text),
        "orjson": lambda: orjson.loads(text),
        "msgspec": lambda: msgspec.json.decode(text),
        "json": lambda: json.loads(text),
    }
    rates = {}
    for name, parse in parsers.items():
        best = float("inf")
        for _ in range(repeats if not name.startswith("json") else 2):
            t = time.perf_counter()
            parse()
            best = min(best, time.perf_counter() - t)
        rates[name] = len(text) / 2**20 / best
    return rates


def main() -> None:
    args = parse_args()
    if args.side:
        benchlib.emit(run_side(args))
        return
    from data_pipeline.reader import iter_raw_records

    sizes = [float(s) for s in args.sizes_mb.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        os.makedirs(work, exist_ok=True)
        teacher_dir, _ = seed_data.make_tokenizers(work, args.teacher_vocab)
        tok_dir = os.path.dirname(teacher_dir)
        print(f"setup: seed-format JSON arrays with full logits over V_teacher="
              f"{args.teacher_vocab} (toy byte-level BPE teacher vs '▁'-BPE student), top-k "
              f"{args.top_k}; ours with {args.workers} workers; {benchlib.load()}")
        rates = {}
        for size in sizes:
            src = os.path.join(work, f"seed_{size:g}mb.json")
            gen = seed_data.write_seed_file(src, teacher_dir, target_bytes=int(size * 2**20))
            mib = gen["bytes"] / 2**20
            print(f"input {src}: {mib:.0f} MiB, {gen['examples']} examples, "
                  f"{gen['teacher_tokens']} teacher tokens "
                  f"({gen['bytes'] / gen['teacher_tokens'] / 1024:.0f} KiB of JSON each)")
            record = next(iter_raw_records(src)).text
            bare = bare_parse_rates(record)
            print(f"  bare parse of its first record ({len(record) / 2**20:.0f} MiB): " + ", ".join(
                f"{name} {rate:.0f} MiB/s" for name, rate in bare.items()))
            kept = bare["simdjson"]
            del record
            for side in ("ours", "original"):
                if side == "original" and size > args.original_max_mb:
                    print(f"  [original] skipped (> --original-max-mb {args.original_max_mb:g})")
                    continue
                out = os.path.join(work, f"{side}_{size:g}")
                r = benchlib.run_side(__file__, sys.argv[1:] + ["--side", side, src, out,
                                                                 tok_dir])
                rates[side, size] = gen["examples"] / r["seconds"]
                workers = (f" + largest worker {r['worker_peak_rss_mib']:.0f} MiB"
                           if side == "ours" and args.workers > 1 else "")
                print(f"  [{side}] {r['seconds']:.1f} s: {rates[side, size]:.2f} examples/s, "
                      f"{mib / r['seconds']:.1f} MiB/s; peak RSS {r['peak_rss_mib']:.0f} MiB"
                      f"{workers}; {r['load']}")
                if side == "ours":  # from the report's clock: without imports and tokenizer loads
                    per_worker = mib / r["convert_seconds"] / args.workers
                    print(f"  [ours] per worker {per_worker:.1f} MiB/s ({r['convert_seconds']:.1f}"
                          f" s without start-up) = "
                          f"{100 * per_worker / kept:.0f}% of simdjson's bare parse rate "
                          f"(goal >= 70%)")
                shutil.rmtree(out, ignore_errors=True) if os.path.isdir(out) else os.remove(out)
            os.remove(src)
            if ("original", size) in rates:
                print(f"  speedup ours / original: "
                      f"{rates['ours', size] / rates['original', size]:.1f}x (goal >= 3x)")


if __name__ == "__main__":
    main()
