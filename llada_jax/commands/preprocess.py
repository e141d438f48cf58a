"""`llada-jax preprocess`: teacher-logit dumps -> aligned top-k TFDS dataset + report
(data_pipeline/preprocess.py does the work)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from data_pipeline import placeholders, records
from data_pipeline.convert import Options
from data_pipeline.preprocess import BEAM_RUNNERS, checked_inputs, preprocess, report_dir
from data_pipeline.report import human_summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True,
                   help="JSON / JSONL / CSV (prompt, response, logits_data) files or globs")
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
    p.add_argument("--placeholders", metavar="MAP",
                   help="rewrite the original's prompt markers (<BOS>, <eot_id>, ...) to student "
                   f"special tokens: a preset ({', '.join(placeholders.PRESETS)}) or a JSON map "
                   "file {marker: special token}; default: text as is")
    p.add_argument("--record-format", type=int, choices=records.FORMATS, default=2,
                   help="2: quantised top-k (codec.py, ~2.x bytes a slot); 1: float32 + int32")
    p.add_argument("--beam-runner", choices=BEAM_RUNNERS,
                   help="run the conversion as an Apache Beam pipeline on this runner (the "
                   "[beam] extra); --workers is then the runner's business")
    p.add_argument("--beam-options", default="",
                   help='Beam pipeline options, e.g. "--project P --region R --temp_location '
                   'gs://B/tmp" or "--direct_num_workers 2 --direct_running_mode '
                   'multi_processing"')
    p.add_argument("--overwrite", action="store_true", help="rebuild an existing dataset")


def run(args: argparse.Namespace) -> int:
    report = preprocess(
        checked_inputs(args.input), args.out,
        Options(args.student_tokenizer, args.teacher_tokenizer, args.max_length, args.top_k,
                args.teacher_vocab_size, args.overlength, args.validation_fraction,
                placeholders.load_map(args.placeholders) if args.placeholders else None,
                args.record_format),
        workers=args.workers, in_flight_bytes=args.in_flight_mb << 20,
        overwrite=args.overwrite, beam_runner=args.beam_runner,
        beam_options=args.beam_options)
    summary = {k: report[k] for k in ("read", "written", "skipped", "coverage",
                                      "bytes_per_response_token") if k in report}
    print(json.dumps(summary, indent=2))
    print(human_summary(report, report_dir(args.out, report)), file=sys.stderr)
    return 0 if report["written"] else 1
