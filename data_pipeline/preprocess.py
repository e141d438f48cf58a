"""Teacher-logit dumps -> aligned top-k TFDS dataset + report (`llada-jax preprocess`,
commands/preprocess.py).

    llada-jax preprocess --input dump.json more/*.jsonl --out DATA_DIR \\
        --student-tokenizer LLADA_TOK [--teacher-tokenizer LLAMA_TOK] --max-length 4096 \\
        --top-k 64 [--workers W] [--overlength skip|truncate] [--overwrite]

The main process frames records (reader.py: where each one lies in its file) and writes shards
(records.py); W spawned worker processes (worker.py) read each record's bytes from the file and
parse, validate, tokenize and compute targets (convert.py), in input order. At most 2*W records
and `--in-flight-mb` of raw JSON are queued for the workers, and each worker holds one record,
so memory stays bounded by a few records whatever the input size. The dataset lands in
DATA_DIR/teacher_targets/1.0.0/ with report.json and skipped.jsonl. A finished dataset with the
same options and the same inputs (paths, sizes, modification times) is reused; other options or
inputs need --overwrite. A crashed run leaves only an `incomplete.*` directory (and, killed
during --overwrite, the old dataset set aside), which the next run removes (or puts back). A
run that writes no record leaves no dataset: its report goes to DATA_DIR/report.json.
"""

from __future__ import annotations

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

import tqdm

from data_pipeline import alignment, fileio, records, worker
from data_pipeline.convert import Converter, Options, Result
from data_pipeline.errors import DataError
from data_pipeline.reader import RecordSpan, csv_header, expand_inputs, is_csv, iter_record_spans
from data_pipeline.report import Report, file_order

PROGRESS_MIN_BYTES = 64 << 20
BEAM_RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner")


def report_dir(out: str, report: dict) -> str:
    """Where the run's report.json lies: in the dataset, or in `out` when nothing was written."""
    return os.path.join(out, records.NAME, records.VERSION) if report["written"] else out


def checked_inputs(patterns: list[str]) -> list[str]:
    """The input files; a folder given as an input is named as such, not as missing."""
    for pattern in patterns:
        if not fileio.is_remote(pattern) and os.path.isdir(pattern):
            raise DataError(f"--input {pattern} is a folder; pass its files (e.g. "
                            f"{os.path.join(pattern, '*.jsonl')})")
    return expand_inputs(patterns)


def preprocess(files: list[str], out: str, opts: Options, *, workers: int = 1,
               in_flight_bytes: int = 256 << 20, overwrite: bool = False,
               beam_runner: str | None = None, beam_options: str = "") -> dict:
    """Builds (or reuses) the dataset under `out`; returns the report dict. With `beam_runner`
    the conversion runs as a Beam pipeline (beam_pipeline.py) instead of local workers."""
    converter = checked_converter(opts)  # validates the tokenizers before any worker starts
    for f in files:
        if is_csv(f):
            csv_header(f)  # a CSV without the needed columns is a user error, before any work
    input_bytes = sum(fileio.size(f) for f in files)

    def results() -> Iterator[Result]:
        with _progress(input_bytes) as bar:
            spans = _counted((s for f in files for s in iter_record_spans(f)), bar)
            yield from _convert_all(spans, opts, converter, workers, in_flight_bytes)

    return write_dataset(results, out, opts, converter, inputs=files, input_bytes=input_bytes,
                         workers=workers, overwrite=overwrite, beam_runner=beam_runner,
                         beam_options=beam_options, sources=input_identity(files))


def input_identity(files: list[str]) -> list[dict]:
    """What identifies the inputs without reading them: path, size, modification time (local)."""
    out = []
    for f in files:
        entry = {"path": f if fileio.is_remote(f) else os.path.abspath(f), "size": fileio.size(f)}
        if not fileio.is_remote(f):
            entry["mtime_ns"] = os.stat(f).st_mtime_ns
        out.append(entry)
    return out


def checked_converter(opts: Options) -> Converter:
    if opts.top_k < 1 or opts.max_length < 1:
        raise DataError("--top-k and --max-length must be positive")
    if not 0 <= opts.validation_fraction < 1:
        raise DataError(f"--validation-fraction {opts.validation_fraction} must be in [0, 1): "
                        f"the share of examples held out for validation")
    if opts.record_format not in records.FORMATS:
        raise DataError(f"record format {opts.record_format}: expected one of {records.FORMATS}")
    return Converter(opts)


def write_dataset(results: Callable[[], Iterator[Result]], out: str, opts: Options,
                  converter: Converter, *, inputs: list[str], input_bytes: int, workers: int = 1,
                  overwrite: bool = False, beam_runner: str | None = None,
                  beam_options: str = "", sources=None) -> dict:
    """The dataset, report.json and skipped.jsonl under `out` from converted records
    (`results()`, called once unless a finished dataset with these options and `sources` is
    reused): what preprocess writes, also used by generate-teacher --records. `sources`
    (JSON-able) identifies the inputs: the files' identity, or the prompts and decoding settings.
    With `beam_runner` the inputs are converted on Beam instead (`results` is not called)."""
    metadata = _metadata(opts, converter) | {"sources": sources}
    final = os.path.join(out, records.NAME, records.VERSION)
    if not fileio.is_remote(out):
        clean_litter(out)
    if _exists(final) and not overwrite:
        return _reuse(final, metadata)
    start = time.time()

    def extra() -> dict:
        seconds = time.time() - start
        return {"vocab_matched_pct": converter.vocab_matched_pct(),
                "alignment_mode": converter.mode, "inputs": inputs, "seconds": round(seconds, 2),
                "input_mb_per_s": round(input_bytes / 1e6 / max(seconds, 1e-9), 2),
                "workers": workers, "beam_runner": beam_runner, "metadata": metadata}

    if beam_runner:
        return _beam_pipeline().run_beam(inputs, out, opts, metadata, beam_runner, beam_options,
                                         extra, overwrite)
    if fileio.is_remote(out):
        raise DataError(f"--out {out}: a bucket path needs --beam-runner")
    for stale in glob.glob(os.path.join(out, records.NAME, f"incomplete.*{records.VERSION}")):
        shutil.rmtree(stale)  # left by a run that crashed
    os.makedirs(out, exist_ok=True)
    report = Report(os.path.join(out, f".skipped-{os.getpid()}.jsonl"), file_order(inputs))
    summary: dict = {}

    def examples() -> Iterator[tuple[str, dict]]:
        for result in results():
            report.add(result)
            if result.example is not None:
                yield result.split, result.example

    def on_complete(data_dir: str, counts: dict[str, int]) -> None:
        shards = glob.glob(os.path.join(data_dir, "*.array_record*"))
        shard_bytes = sum(os.path.getsize(p) for p in shards)
        summary.update(report.finish(data_dir, shard_bytes, extra()))
        assert counts == {s: summary["written_per_split"].get(s, 0) for s in records.SPLITS}

    # --overwrite: the old dataset stays (renamed aside) until the new one is complete.
    previous = f"{final}{REPLACED}{os.getpid()}"
    if os.path.isdir(final):
        os.rename(final, previous)
    try:
        builder = records.TeacherTargets(data_dir=out, examples=examples, metadata=metadata,
                                         on_complete=on_complete)
        builder.download_and_prepare(file_format="array_record")
        if not summary["written"]:  # never a finished dataset that holds nothing
            _set_aside_report(final, out)
            shutil.rmtree(final)
    except BaseException:
        if os.path.isdir(previous):
            shutil.rmtree(final, ignore_errors=True)
            os.rename(previous, final)
        raise
    if os.path.isdir(previous) and not os.path.isdir(final):
        os.rename(previous, final)  # an empty rebuild keeps the dataset it would replace
    shutil.rmtree(previous, ignore_errors=True)
    return summary


REPLACED = ".replaced-"  # FINAL.replaced-PID: the dataset an --overwrite run set aside


def _set_aside_report(final: str, out: str) -> None:
    for name in ("report.json", "skipped.jsonl"):
        os.replace(os.path.join(final, name), os.path.join(out, name))


def clean_litter(out: str) -> None:
    """What a killed run left in `out`: its skip listing (removed) and, killed during
    --overwrite, the dataset it had set aside (put back if no dataset replaced it, else
    removed). Files of a run still alive are left alone."""
    final = os.path.join(out, records.NAME, records.VERSION)
    for aside in glob.glob(f"{final}{REPLACED}*"):
        pid = aside.rsplit(REPLACED, 1)[1]
        if not pid.isdigit() or fileio.pid_alive(int(pid)):
            continue
        if os.path.isdir(final):
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(aside, final)
    for listing in glob.glob(os.path.join(out, ".skipped-*.jsonl")):
        pid = os.path.basename(listing)[len(".skipped-"):-len(".jsonl")]
        if pid.isdigit() and not fileio.pid_alive(int(pid)):
            os.remove(listing)


def _beam_pipeline():
    try:
        from data_pipeline import beam_pipeline
    except ImportError as e:
        raise DataError(f"--beam-runner needs Apache Beam ({e}): pip install 'llada-jax[beam]'"
                         ) from None
    return beam_pipeline


def _progress(input_bytes: int) -> tqdm.tqdm:
    """A progress bar (input MB and MB/s, records) on stderr for inputs worth watching, only
    when stderr is a terminal (a log file would fill with carriage-return updates)."""
    show = sys.stderr.isatty() and input_bytes >= PROGRESS_MIN_BYTES
    return tqdm.tqdm(total=input_bytes, unit="B", unit_scale=True, desc="preprocess",
                     disable=not show, mininterval=1.0, file=sys.stderr)


def _counted(spans: Iterator[RecordSpan], bar: tqdm.tqdm) -> Iterator[RecordSpan]:
    for n, span in enumerate(spans, 1):
        bar.update(span.end - span.start)
        bar.set_postfix_str(f"{n} records", refresh=False)
        yield span


def _metadata(opts: Options, converter: Converter) -> dict:
    # The student's special tokens are stored so that training finds its mask and eos ids
    # without reopening the tokenizer (loader.DatasetMeta.mask_and_eos_ids).
    added = alignment.load_tokenizer(opts.student_tokenizer).get_added_tokens_decoder()
    return {"options": dataclasses.asdict(opts), "record_format": opts.record_format,
            "top_k": opts.top_k,
            "max_length": opts.max_length, "alignment_mode": converter.mode,
            "student_vocab_size": len(converter.student),
            "special_tokens": {t.content: int(i) for i, t in sorted(added.items())}}


def _exists(path: str) -> bool:
    if fileio.is_remote(path):
        return _beam_pipeline().FileSystems.exists(path)
    return os.path.isdir(path)


def _reuse(final: str, metadata: dict) -> dict:
    with fileio.open_read(os.path.join(final, "report.json")) as f:
        report = json.load(f)
    metadata = json.loads(json.dumps(metadata))
    if report["metadata"] != metadata:
        raise DataError(f"{final} already holds a dataset, built from "
                        f"{_difference(report['metadata'], metadata)}; pass --overwrite to "
                        f"rebuild it, or choose another --out")
    print(f"preprocess: reusing the finished dataset in {final}", file=sys.stderr)
    return report


def _difference(old: dict, new: dict) -> str:
    """What differs between a dataset's metadata and this run's, in words."""
    if old.get("sources") != new.get("sources"):
        return (f"other inputs ({json.dumps(old.get('sources'))}); this run's are "
                f"{json.dumps(new.get('sources'))}")
    keys = sorted(k for k in old.keys() | new.keys() if k != "sources" and old.get(k) != new.get(k))
    if "options" in keys:
        before = old.get("options") or {}
        changed = {k: (before.get(k), v) for k, v in new["options"].items() if before.get(k) != v}
        return "other options (" + ", ".join(f"{k}: {a!r} there, {b!r} now"
                                             for k, (a, b) in changed.items()) + ")"
    return "other settings (" + ", ".join(keys) + ")"


def _convert_all(spans: Iterator[RecordSpan], opts: Options, converter: Converter,
                 workers: int, in_flight_bytes: int) -> Iterator[Result]:
    """Converted records in input order; W worker processes with a bounded in-flight window."""
    if workers <= 1:
        yield from (converter.convert(span.map()) for span in spans)
        return
    # spawn: no fork of a process holding threads. A worker that dies (or fails to load the
    # tokenizers) raises BrokenProcessPool here instead of hanging the run.
    with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"),
                             initializer=worker.init, initargs=(converter, os.getpid())) as pool:
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
