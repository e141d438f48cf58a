"""`llada-jax eval`: how good a drafter the student is, under the drafting condition.

    llada-jax eval --ckpt CKPT --data DATA_DIR [--gamma 4 8 16] [--out eval.json] [--teacher T]

The metrics are `llada_jax.eval.evaluate.evaluate_split`; with --teacher the measured tokens per
target call of `llada_jax.speculate.loop.speculate` go beside the alpha-predicted E(gamma).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from data_pipeline import loader as data_loader
from data_pipeline.loader import prompt_texts
from llada_jax import reports
from llada_jax.checkpoints import load_model, peek_config
from llada_jax.errors import UserError
from llada_jax.eval.evaluate import check_data_fits, evaluate_split
from llada_jax.metrics_writer import write_scalars
from llada_jax.speculate.loop import Decoding, speculate, tokenizer_dir
from llada_jax.train import config as train_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="train workdir, params checkpoint or HF dir")
    parser.add_argument("--data", required=True, help="a `llada-jax preprocess` output dir")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--gamma", type=int, nargs="+", default=[4, 8, 16],
                        help="draft block lengths to report")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=None,
                        help="row length (default: the dataset's longest example)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cut points")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="scored positions per LM-head chunk (default: config eval.chunk_size)")
    parser.add_argument("--max-batches", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the JSON report here too")
    parser.add_argument("--tensorboard", default=None, help="also write scalars to this dir")
    add_teacher_arguments(parser)


def add_teacher_arguments(parser: argparse.ArgumentParser) -> None:
    """`eval --teacher`: the measured tokens per target call beside the α-predicted E(γ)."""
    group = parser.add_argument_group("measured speculative decoding (optional)")
    group.add_argument("--teacher", default=None, help="causal teacher checkpoint: also measure")
    group.add_argument("--teacher-tokenizer", default=None, help="default: the --teacher dir")
    group.add_argument("--drafter-tokenizer", default=None, help="default: the --ckpt dir")
    group.add_argument("--speculate-prompts", type=int, default=32,
                       help="held-out prompts (from the split's records) to decode")
    group.add_argument("--speculate-new-tokens", type=int, default=32)


def measured_for_eval(args: argparse.Namespace, drafter_model, results: dict) -> None:
    """Adds E_measured_greedy / E_measured_sampled (T = 1, TLI) to each results['gamma=G']."""
    drafter_tokenizer = tokenizer_dir(args.drafter_tokenizer, args.ckpt, "--drafter-tokenizer")
    prompts = prompt_texts(args.data, args.split, drafter_tokenizer, args.speculate_prompts)
    teacher = load_model(args.teacher, compute_dtype="float32", causal=True, role="--teacher")[1]
    for gamma in args.gamma:
        for name, greedy in (("greedy", True), ("sampled", False)):
            summary = speculate(args.ckpt, args.teacher, prompts, gamma=gamma,
                                decoding=Decoding(args.speculate_new_tokens, greedy=greedy),
                                drafter_tokenizer=drafter_tokenizer,
                                teacher_tokenizer=args.teacher_tokenizer, seed=args.seed,
                                drafter_model=drafter_model, teacher_model=teacher)["summary"]
            results[f"gamma={gamma}"][f"E_measured_{name}"] = summary["tokens_per_target_call"]


def run(args: argparse.Namespace) -> int:
    small = [f"--{name.replace('_', '-')} must be at least 1 (got {value})"
             for name, value in (("batch_size", args.batch_size), ("seq_len", args.seq_len),
                                 ("max_batches", args.max_batches), ("gamma", min(args.gamma)))
             if value is not None and value < 1]
    if small:
        raise UserError("; ".join(small))
    meta = data_loader.read_metadata(args.data)  # the cheap checks first
    if not (peek := peek_config(args.ckpt)) or not peek.causal:  # load_model names a causal one
        check_data_fits(args.ckpt, args.data, meta)
    print(f"eval: loading {args.ckpt}, then scoring split {args.split!r} "
          f"({meta.num_examples.get(args.split, 0)} examples)", file=sys.stderr, flush=True)
    _, model = load_model(args.ckpt, causal=False, role="--ckpt")
    eval_config = train_config.default_config().eval
    eval_config.update(gammas=tuple(args.gamma), seed=args.seed)
    if args.chunk_size:
        eval_config.chunk_size = args.chunk_size
    results = evaluate_split(model, args.data, args.split, eval_config,
                             batch_size=args.batch_size, seq_len=args.seq_len,
                             max_batches=args.max_batches)
    if args.teacher:
        measured_for_eval(args, model, results)
    text = json.dumps(results, indent=2)
    print(text)  # for programs; people read the table (stderr, as preprocess's summary)
    print(reports.eval_table(results), file=sys.stderr)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    if args.tensorboard:
        write_scalars(args.tensorboard, [(f"eval/{name}", value, 0)
                                         for name, value in results["overall"].items()])
    return 0
