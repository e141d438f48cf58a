"""`preprocess --beam-runner RUNNER [--beam-options "..."]`: the same conversion as an Apache
Beam pipeline, for dumps too large for one host (needs the `[beam]` extra).

The dataset is written by TFDS's own Beam support for dataset builders
(`GeneratorBasedBuilder` with a pipeline; its BeamWriter writes ArrayRecord shards), with the
builder name, version, features and metadata of the local route (records.TeacherTargetsInfo),
so `open_split` / `make_loader` read either the same way. Pipeline:

    input files -> frame each file (reader.iter_record_spans) -> reshuffle the record spans over
    the workers -> convert (convert.Converter, one per worker: the local route's validation,
    alignment and targets) -> per split: (key "file#index", stored example) -> TFDS
                                       -> skipped records -> text files -> skipped.jsonl
                                       -> counts (report.Report, merged) -> report.json

Input files are split across workers (a single file is framed by one worker, its records then
spread). The split of a record is the local route's (a hash of its text), and the skip listing
is sorted into input order, so records (as a set), splits, report counts and skip listing equal
the local route's. TFDS's Beam writer refuses an empty split, so a split the run cannot fill
(--validation-fraction 0 or 1) is not generated, and a run that writes nothing to a split it
generates fails with TFDS's message (the local route writes an empty split instead).
"""

from __future__ import annotations

import json
import os
import shlex
import uuid
from collections.abc import Callable

import apache_beam as beam
import tensorflow_datasets as tfds
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from data_pipeline import records
from data_pipeline.convert import Converter, Options, Result
from data_pipeline.reader import iter_record_spans
from data_pipeline.report import Report, file_order

class _Convert(beam.DoFn):
    def __init__(self, opts: Options):
        self.opts = opts

    def setup(self) -> None:
        self.converter = Converter(self.opts)

    def process(self, span):
        yield self.converter.convert(span.map())


class _Count(beam.CombineFn):
    """Results -> the merged counts of a Report (no examples kept)."""

    def __init__(self, files: list[str]):
        self.order = file_order(files)

    def create_accumulator(self) -> Report:
        return Report(file_order=self.order)

    def add_input(self, report: Report, result: Result) -> Report:
        report.add(result)
        return report

    def merge_accumulators(self, reports) -> Report:
        reports = iter(reports)
        first = next(reports)
        for other in reports:
            first.merge(other)
        return first

    def extract_output(self, report: Report) -> str:
        return json.dumps({"read": report.read, "written": report.written,
                           "skipped": report.skipped, "first_skip": report.first_skip,
                           "totals": report.totals, "tokens": report.tokens})


def _skip_line(result: Result) -> list[str]:
    if result.example is not None:
        return []
    return [json.dumps({"file": result.file, "index": result.index, "reason": result.reason,
                        "detail": result.detail})]


class TeacherTargetsBeam(records.TeacherTargetsInfo, tfds.core.GeneratorBasedBuilder,
                         skip_registration=True):
    name = records.NAME

    def __init__(self, *, data_dir: str, files: list[str], opts: Options, metadata: dict,
                 side_dir: str):
        self._files, self._opts, self._side_dir = files, opts, side_dir
        self._setup(metadata)
        super().__init__(data_dir=data_dir)

    def _split_generators(self, dl_manager, pipeline):
        del dl_manager
        results = (pipeline
                   | "Files" >> beam.Create(self._files)
                   | "Frame" >> beam.FlatMap(iter_record_spans)
                   | "Spread" >> beam.Reshuffle()
                   | "Convert" >> beam.ParDo(_Convert(self._opts)))
        _ = (results | "SkipLines" >> beam.FlatMap(_skip_line)
             | "WriteSkips" >> beam.io.WriteToText(os.path.join(self._side_dir, "skipped")))
        _ = (results | "Count" >> beam.CombineGlobally(_Count(self._files))
             | "WriteCounts" >> beam.io.WriteToText(os.path.join(self._side_dir, "counts")))
        fraction = self._opts.validation_fraction
        splits = [s for s, empty in (("train", fraction >= 1), ("validation", fraction <= 0))
                  if not empty]
        return {split: results | f"Pick_{split}" >> beam.FlatMap(
            _examples_of, split=split, record_format=self._format) for split in splits}

    def _generate_examples(self):  # the splits are PCollections, built above
        raise NotImplementedError


def _examples_of(result: Result, split: str, record_format: int):
    if result.example is not None and result.split == split:
        yield f"{result.file}#{result.index}", records.stored(result.example, record_format)


def run_beam(files: list[str], out: str, opts: Options, metadata: dict, runner: str,
             beam_options: str, extra: Callable[[], dict], overwrite: bool) -> dict:
    """Builds the dataset under `out` on Beam; writes report.json and skipped.jsonl next to it
    (through Beam's filesystems, so `out` may be a bucket path); returns the report. With
    `overwrite` an existing dataset is deleted first (unlike the local route, it is not kept
    aside until the new one is complete)."""
    final = os.path.join(out, records.NAME, records.VERSION)
    if overwrite and FileSystems.exists(final):
        FileSystems.delete([final])
    tfds.disable_progress_bar()  # preprocess prints its own summary
    side_dir = os.path.join(out, f".beam-side-{uuid.uuid4().hex[:8]}")
    builder = TeacherTargetsBeam(data_dir=out, files=files, opts=opts, metadata=metadata,
                                 side_dir=side_dir)
    config = tfds.download.DownloadConfig(
        beam_runner=runner, beam_options=PipelineOptions(shlex.split(beam_options or "")))
    builder.download_and_prepare(file_format="array_record", download_config=config)
    report = _gather_report(side_dir, files, final, extra())
    FileSystems.delete([side_dir])
    return report


def _set_num_tokens(final: str, tokens: dict[str, int]) -> None:
    """Adds the per-split token counts to the dataset metadata (the local route's builder sets
    them while writing; here they are known only once the pipeline has run)."""
    path = os.path.join(final, "metadata.json")
    with FileSystems.open(path) as f:
        metadata = json.loads(f.read().decode("utf-8"))
    metadata["num_tokens"] = {s: int(tokens.get(s, 0)) for s in records.SPLITS}
    metadata[records.NUM_TOKENS_UNIT] = "tokens"
    with FileSystems.create(path) as f:
        f.write(json.dumps(metadata).encode("utf-8"))


def _read_lines(pattern: str) -> list[str]:
    lines = []
    for match in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(match.path) as f:
            lines.extend(line for line in f.read().decode("utf-8").splitlines() if line)
    return lines


def _gather_report(side_dir: str, files: list[str], final: str, extra: dict) -> dict:
    counts = json.loads(_read_lines(os.path.join(side_dir, "counts*"))[0])
    report = Report(file_order=file_order(files))
    report.read = counts["read"]
    for name in ("written", "skipped", "totals", "tokens"):
        getattr(report, name).update(counts[name])
    report.first_skip = counts["first_skip"]
    skips = sorted((json.loads(line) for line in _read_lines(os.path.join(side_dir, "skipped*"))),
                   key=report._order)
    _set_num_tokens(final, report.tokens)
    shards = FileSystems.match([os.path.join(final, "*.array_record*")])[0].metadata_list
    summary = report.build(sum(m.size_in_bytes for m in shards), extra)
    for name, text in (("skipped.jsonl", "".join(json.dumps(s) + "\n" for s in skips)),
                       ("report.json", json.dumps(summary, indent=2))):
        with FileSystems.create(os.path.join(final, name)) as f:
            f.write(text.encode("utf-8"))
    return summary
