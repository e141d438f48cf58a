"""`llada-jax collect`: on-policy training records from speculative decoding
(llada_jax/onpolicy/collect.py).

    llada-jax collect --drafter CKPT --teacher LLAMA --prompts p.txt --records DATA_DIR \\
        [--drafter-tokenizer DIR] [--teacher-tokenizer DIR] --gamma 4 --top-k 64 \\
        --max-length 4096 [--greedy | --temperature T]

DATA_DIR is a dataset like `preprocess` writes (report.json, skipped.jsonl), all in the train
split: train on it alone (--config.data.dir) or mixed with offline data (--config.data.mix).
"""

from __future__ import annotations

import argparse
import json

from data_pipeline import records
from llada_jax.commands.speculate import add_decoding_arguments, resolve_draft_shape
from llada_jax.errors import SpeculateError
from llada_jax.onpolicy import collect
from llada_jax.speculate import loop as sp
from llada_jax.teacher.prompts import read_prompts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_decoding_arguments(parser)
    parser.add_argument("--records", required=True, help="the dataset directory to write")
    parser.add_argument("--top-k", type=int, default=64, help="teacher targets kept per position")
    parser.add_argument("--max-length", type=int, default=4096,
                        help="max student tokens per record (context + gamma + trailing masks)")
    parser.add_argument("--record-format", type=int, choices=records.FORMATS, default=2)
    parser.add_argument("--greedy", action="store_true", help="greedy teacher and drafter")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sampling temperature of the teacher and the drafter")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="teacher tokens per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="rebuild an existing dataset")


def run(args: argparse.Namespace) -> int:
    resolve_draft_shape(args)
    if args.gamma < 1 or args.temperature <= 0 or args.max_new_tokens < 2:
        raise SpeculateError("need --gamma >= 1, --temperature > 0 and --max-new-tokens >= 2")
    prompts = list(read_prompts(args.prompts))[:args.max_prompts]
    decoding = sp.Decoding(args.max_new_tokens, greedy=args.greedy, temperature=args.temperature)
    session = sp.setup(args.drafter, args.teacher, prompts, gamma=args.gamma, steps=args.steps,
                       trailing_masks=args.trailing_masks, decoding=decoding,
                       drafter_tokenizer=args.drafter_tokenizer,
                       teacher_tokenizer=args.teacher_tokenizer)
    opts = collect.collector_options(
        session, sp.tokenizer_dir(args.drafter_tokenizer, args.drafter, "--drafter-tokenizer"),
        sp.tokenizer_dir(args.teacher_tokenizer, args.teacher, "--teacher-tokenizer"),
        args.top_k, args.max_length, args.record_format)
    report = collect.write_records(collect.HostLoopCollector(session, decoding), prompts,
                                   args.records, opts, seed=(args.seed,), overwrite=args.overwrite)
    print(json.dumps({k: report[k] for k in ("read", "written", "skipped", "coverage")
                      if k in report}, indent=2))
    return 0
