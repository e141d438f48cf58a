"""Preprocessing: `llada-jax preprocess` vs the original's approach, on generated seed-format
files with full logits at two sizes (examples/s, input MB/s, peak RSS).

Ours: the real preprocess (streaming reader, W spawned workers, top-k 64 targets, ArrayRecord
shards). Original: bench/seed_data.original_preprocess (json.load of the whole file, a dense
float32 [L, V_teacher] tensor per example, torch.save of the list). Each run is its own
subprocess; peak RSS is ru_maxrss of the main process and of its largest worker (the workers
run at the same time, so main + W x worker bounds the total).

For each input it first measures, on the input's first record, the bare parse rate of the kept
parsers, in CPU time (mean of 5): simdjson's parse alone (its tape: every number parsed and
checked, none handed over: the goal's yardstick), simdjson's parse plus `as_buffer` of every
`full_logits` (the numbers handed over as float64, as fast_logits needs them: the comparable
figure, since pysimdjson's as_buffer walks its tape element by element), and orjson, msgspec and
json (Python objects). Ours is then set against it per worker: input MiB over the CPU seconds
its workers spent (start-up included; the main process's framing and writing, on its own core,
reported apart), and input MiB / wall seconds / workers, which the other jobs on this host
also load (goal: >= 70% of the bare parse at V_teacher = 128256).

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
    start, cpu = time.perf_counter(), _cpu_seconds(resource.RUSAGE_SELF)
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
    result["main_cpu_seconds"] = _cpu_seconds(resource.RUSAGE_SELF) - cpu
    result["worker_cpu_seconds"] = _cpu_seconds(resource.RUSAGE_CHILDREN)  # ended workers
    result["worker_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _mean_cpu_seconds(parse, repeats: int) -> float:
    """Mean CPU seconds of `repeats` calls after a first one (which sizes the parser's buffers):
    a mean, like our rate over a whole run, on a host that other jobs load too."""
    parse()
    start = time.process_time()
    for _ in range(repeats):
        parse()
    return (time.process_time() - start) / repeats


def bare_parse_rates(text: bytes, repeats: int = 5) -> dict[str, float]:
    """MiB/s (CPU time, mean of `repeats`) of each kept parser on one record's JSON text."""
    import json

    import msgspec
    import numpy as np
    import simdjson

    parser = simdjson.Parser()

    def simdjson_numbers():
        doc = parser.parse(text)
        arrays = [np.frombuffer(entry["full_logits"].as_buffer(of_type="d"), np.float64)
                  for entry in doc["logits"]]
        del doc
        return arrays

    parsers = {
        "simdjson": lambda: parser.parse(text) and None,  # the document freed: parser reusable
        "simdjson+as_buffer": simdjson_numbers,
        "msgspec": lambda: msgspec.json.decode(text),
        "json": lambda: json.loads(text),
    }
    try:
        import orjson  # the [bench] extra
        parsers["orjson"] = lambda: orjson.loads(text)
    except ImportError:
        print("orjson not installed (pip install -e '.[bench]'): its bare rate is left out",
              flush=True)
    return {name: len(text) / 2**20 / _mean_cpu_seconds(parse, 1 if name == "json" else repeats)
            for name, parse in parsers.items()}


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
        rates, worker_cpu = {}, []
        for size in sizes:
            src = os.path.join(work, f"seed_{size:g}mb.json")
            gen = seed_data.write_seed_file(src, teacher_dir, target_bytes=int(size * 2**20))
            mib = gen["bytes"] / 2**20
            print(f"input {src}: {mib:.0f} MiB, {gen['examples']} examples, "
                  f"{gen['teacher_tokens']} teacher tokens "
                  f"({gen['bytes'] / gen['teacher_tokens'] / 1024:.0f} KiB of JSON each)")
            record = next(iter_raw_records(src)).text
            bare = bare_parse_rates(record)
            print(f"  bare parse of its first record ({len(record) / 2**20:.0f} MiB), CPU time: "
                  + ", ".join(f"{name} {rate:.0f} MiB/s" for name, rate in bare.items()))
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
                if side == "ours":
                    _print_per_worker(mib, r, args.workers, bare)
                    worker_cpu.append((mib, r["worker_cpu_seconds"]))
                shutil.rmtree(out, ignore_errors=True) if os.path.isdir(out) else os.remove(out)
            os.remove(src)
            if ("original", size) in rates:
                print(f"  speedup ours / original: "
                      f"{rates['ours', size] / rates['original', size]:.1f}x (goal >= 3x)")
        if len(worker_cpu) > 1 and args.workers > 1:  # start-up cancels out in the difference
            (mib0, cpu0), (mib1, cpu1) = worker_cpu[0], worker_cpu[-1]
            rate = (mib1 - mib0) / (cpu1 - cpu0)
            print(f"[ours] per worker, marginal (CPU, {mib0:.0f} -> {mib1:.0f} MiB): {rate:.0f} "
                  f"MiB/s = {100 * rate / bare['simdjson']:.0f}% of simdjson's bare parse (last "
                  f"input), {100 * rate / bare['simdjson+as_buffer']:.0f}% with as_buffer")


def _print_per_worker(mib: float, r: dict, workers: int, bare: dict[str, float]) -> None:
    """Our per-worker rates against the bare parse of one record (simdjson's tape, and with the
    numbers handed over)."""
    cpu = r["worker_cpu_seconds"] if workers > 1 else r["main_cpu_seconds"]
    rates = {"CPU": mib / cpu, "wall": mib / r["convert_seconds"] / workers}
    for what, rate in rates.items():
        print(f"  [ours] per worker ({what}) {rate:.0f} MiB/s = "
              f"{100 * rate / bare['simdjson']:.0f}% of simdjson's bare parse, "
              f"{100 * rate / bare['simdjson+as_buffer']:.0f}% of it with as_buffer (goal >= 70%)")
    if workers > 1:
        print(f"  [ours] CPU seconds: workers {r['worker_cpu_seconds']:.1f} (start-up included), "
              f"main {r['main_cpu_seconds']:.1f} (framing, writing, its own start-up); wall "
              f"{r['convert_seconds']:.1f} s on the report's clock")


if __name__ == "__main__":
    main()
