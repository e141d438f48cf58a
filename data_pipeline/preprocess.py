"""`llada-jax preprocess`: teacher-logit dumps -> aligned top-k TFDS dataset + report.

    llada-jax preprocess --input dump.json more/*.jsonl --out DATA_DIR \\
        --student-tokenizer LLADA_TOK [--teacher-tokenizer LLAMA_TOK] --max-length 4096 \\
        --top-k 64 [--workers W] [--overlength skip|truncate] [--overwrite]

The main process frames records (reader.py: where each one lies in its file) and writes shards
(records.py); W spawned worker processes (worker.py) read each record's bytes from the file and
parse, validate, tokenize and compute targets (convert.py), in input order. At most 2*W records
and `--in-flight-mb` of raw JSON are queued for the workers, and each worker holds one record,
so memory stays bounded by a few records whatever the input size. The dataset lands in
DATA_DIR/teacher_targets/1.0.0/ with report.json and skipped.jsonl. A finished dataset with the
same options is reused; different options need --overwrite; a crashed run leaves only an
`incomplete.*` directory that the next run removes.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor

from data_pipeline import records, worker
from data_pipeline.convert import Converter, Options, Result
from data_pipeline.reader import RecordSpan, expand_inputs, iter_record_spans
from data_pipeline.report import Report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, help="JSON / JSONL files or globs")
    p.add_argument("--out", required=True, help="dataset directory (TFDS data_dir)")
    p.add_argument("--student-tokenizer", required=True, help="local tokenizer.json or HF dir")
    p.add_argument("--teacher-tokenizer", help="local teacher tokenizer (needed for full_logits "
                   "when the tokenizers differ; absent = assumed identical, checked per record)")
    p.add_argument("--teacher-vocab-size", type=int,
                   help="length of full_logits when the teacher vocabulary is padded")
    p.add_argument("--max-length", type=int, required=True, help="max student tokens per example")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--overlength", choices=("skip", "truncate"), default="skip")
    p.add_argument("--validation-fraction", type=float, default=0.05)
    p.add_argument("--in-flight-mb", type=int, default=256,
                   help="raw JSON queued for the workers at once (at least one record)")
    p.add_argument("--overwrite", action="store_true", help="rebuild an existing dataset")


def run(args: argparse.Namespace) -> int:
    try:
        report = preprocess(
            expand_inputs(args.input), args.out,
            Options(args.student_tokenizer, args.teacher_tokenizer, args.max_length, args.top_k,
                    args.teacher_vocab_size, args.overlength, args.validation_fraction),
            workers=args.workers, in_flight_bytes=args.in_flight_mb << 20,
            overwrite=args.overwrite)
    except ValueError as e:
        print(f"preprocess: {e}", file=sys.stderr)
        return 2
    summary = {k: report[k] for k in ("read", "written", "skipped", "coverage",
                                      "bytes_per_response_token") if k in report}
    print(json.dumps(summary, indent=2))
    return 0 if report["written"] else 1


def preprocess(files: list[str], out: str, opts: Options, *, workers: int = 1,
               in_flight_bytes: int = 256 << 20, overwrite: bool = False) -> dict:
    """Builds (or reuses) the dataset under `out`; returns the report dict."""
    converter = _checked_converter(opts)  # validates the tokenizers before any worker starts

    def results() -> Iterator[Result]:
        spans = (s for f in files for s in iter_record_spans(f))
        return _convert_all(spans, opts, converter, workers, in_flight_bytes)

    return write_dataset(results, out, opts, converter, inputs=files,
                         input_bytes=sum(os.path.getsize(f) for f in files), workers=workers,
                         overwrite=overwrite)


def _checked_converter(opts: Options) -> Converter:
    if opts.top_k < 1 or opts.max_length < 1:
        raise ValueError("--top-k and --max-length must be positive")
    return Converter(opts)


def write_dataset(results: Callable[[], Iterator[Result]], out: str, opts: Options,
                  converter: Converter, *, inputs: list[str], input_bytes: int, workers: int = 1,
                  overwrite: bool = False) -> dict:
    """The dataset, report.json and skipped.jsonl under `out` from converted records
    (`results()`, called once unless a finished dataset with these options is reused): what
    preprocess writes, also used by generate-teacher --records."""
    metadata = _metadata(opts, converter)
    final = os.path.join(out, records.NAME, records.VERSION)
    if os.path.isdir(final) and not overwrite:
        return _reuse(final, metadata)
    for stale in glob.glob(os.path.join(out, records.NAME, f"incomplete.*{records.VERSION}")):
        shutil.rmtree(stale)  # left by a run that crashed
    os.makedirs(out, exist_ok=True)
    report = Report(os.path.join(out, f".skipped-{os.getpid()}.jsonl"))
    start = time.time()
    summary: dict = {}

    def examples() -> Iterator[tuple[str, dict]]:
        for result in results():
            report.add(result)
            if result.example is not None:
                yield result.split, result.example

    def on_complete(data_dir: str, counts: dict[str, int]) -> None:
        shards = glob.glob(os.path.join(data_dir, "*.array_record*"))
        shard_bytes = sum(os.path.getsize(p) for p in shards)
        seconds = time.time() - start
        summary.update(report.finish(data_dir, shard_bytes, {
            "vocab_matched_pct": converter.vocab_matched_pct(),
            "alignment_mode": converter.mode, "inputs": inputs, "seconds": round(seconds, 2),
            "input_mb_per_s": round(input_bytes / 1e6 / max(seconds, 1e-9), 2),
            "workers": workers, "metadata": metadata}))
        assert counts == {s: summary["written_per_split"].get(s, 0) for s in records.SPLITS}

    # --overwrite: the old dataset stays (renamed aside) until the new one is complete.
    previous = f"{final}.replaced-{os.getpid()}"
    if os.path.isdir(final):
        os.rename(final, previous)
    try:
        builder = records.TeacherTargets(data_dir=out, examples=examples, metadata=metadata,
                                         on_complete=on_complete)
        builder.download_and_prepare(file_format="array_record")
    except BaseException:
        if os.path.isdir(previous):
            os.rename(previous, final)
        raise
    shutil.rmtree(previous, ignore_errors=True)
    return summary


def _metadata(opts: Options, converter: Converter) -> dict:
    return {"options": dataclasses.asdict(opts), "top_k": opts.top_k,
            "max_length": opts.max_length, "alignment_mode": converter.mode,
            "student_vocab_size": len(converter.student)}


def _reuse(final: str, metadata: dict) -> dict:
    with open(os.path.join(final, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    if report["metadata"] != json.loads(json.dumps(metadata)):
        raise ValueError(f"{final} was built with other options ({report['metadata']['options']});"
                         " pass --overwrite to rebuild it, or choose another --out")
    print(f"preprocess: reusing the finished dataset in {final}", file=sys.stderr)
    return report


def _convert_all(spans: Iterator[RecordSpan], opts: Options, converter: Converter,
                 workers: int, in_flight_bytes: int) -> Iterator[Result]:
    """Converted records in input order; W worker processes with a bounded in-flight window."""
    if workers <= 1:
        yield from (converter.convert(span.read()) for span in spans)
        return
    # spawn: no fork of a process holding threads. A worker that dies (or fails to load the
    # tokenizers) raises BrokenProcessPool here instead of hanging the run.
    with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"),
                             initializer=worker.init, initargs=(opts,)) as pool:
        pending: collections.deque = collections.deque()
        in_flight = 0
        for span in spans:
            size = span.end - span.start
            while pending and (len(pending) >= 2 * workers or in_flight + size > in_flight_bytes):
                job, job_size = pending.popleft()
                in_flight -= job_size
                yield job.result()
            pending.append((pool.submit(worker.convert, span), size))
            in_flight += size
        while pending:
            yield pending.popleft()[0].result()
