"""`llada-jax speculate`: LLaDA drafts, the causal teacher verifies, measured tokens per target call.

    llada-jax speculate --drafter CKPT_or_HF --teacher CKPT_or_HF --prompts FILE \\
        [--drafter-tokenizer DIR] [--teacher-tokenizer DIR] --gamma 4 --steps 1 \\
        --strategy tli|string [--temperature T | --greedy] [--out results.json]

The decoding itself is `llada_jax.speculate.loop.speculate`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from llada_jax import reports
from llada_jax.errors import SpeculateError, UserError
from llada_jax.metrics_writer import write_scalars
from llada_jax.speculate.loop import Decoding, speculate, tensorboard_scalars
from llada_jax.speculate.verify import VERIFIERS
from llada_jax.speculate.vocab_bridge import STRATEGIES
from llada_jax.teacher.prompts import read_prompts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--drafter", required=True, help="LLaDA: params checkpoint, workdir or HF dir")
    parser.add_argument("--teacher", required=True, help="causal teacher checkpoint or HF dir")
    parser.add_argument("--drafter-tokenizer", help="default: the --drafter directory")
    parser.add_argument("--teacher-tokenizer", help="default: the --teacher directory")
    parser.add_argument("--prompts", required=True, nargs="+",
                        help="text (one prompt a line), .jsonl or .json with \"prompt\" fields")
    parser.add_argument("--max-prompts", type=int, default=None)
    parser.add_argument("--gamma", type=int, default=4, help="drafted tokens per block")
    parser.add_argument("--steps", type=int, default=1, help="denoising steps per block")
    parser.add_argument("--trailing-masks", type=int, default=4,
                        help="masks after the block (never filled): text goes on")
    parser.add_argument("--strategy", choices=STRATEGIES, default="tli")
    parser.add_argument("--verifier", choices=VERIFIERS, default="cached",
                        help="teacher with a KV cache, or rerun over the whole sequence per call")
    parser.add_argument("--greedy", action="store_true", help="greedy teacher (the default)")
    parser.add_argument("--temperature", type=float, default=0.0, help="> 0: sample the teacher")
    parser.add_argument("--draft-temperature", type=float, default=None,
                        help="default: --temperature (0 = argmax drafts)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="teacher tokens per prompt")
    parser.add_argument("--teacher-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the teacher's compute dtype")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the JSON results here")
    parser.add_argument("--tensorboard", default=None, help="also write scalars to this dir")


def check_arguments(args) -> list[str]:
    """What is wrong with the decoding flags (empty: nothing)."""
    problems = []
    if args.greedy and args.temperature > 0:
        problems.append("--greedy and --temperature > 0 contradict each other; pick one")
    if args.temperature < 0 or (args.draft_temperature or 0) < 0:
        problems.append("temperatures must be >= 0")
    if args.gamma < 1 or not 1 <= args.steps <= args.gamma:
        problems.append("need --gamma >= 1 and 1 <= --steps <= --gamma")
    if args.max_new_tokens < 1 or args.trailing_masks < 0:
        problems.append("need --max-new-tokens >= 1 and --trailing-masks >= 0")
    return problems


def run(args: argparse.Namespace) -> int:
    problems = check_arguments(args)
    if problems:
        raise SpeculateError("; ".join(problems))
    decoding = Decoding(args.max_new_tokens, greedy=args.temperature == 0,
                        temperature=args.temperature or 1.0)
    try:
        prompts = list(read_prompts(args.prompts))[:args.max_prompts]
        print(f"speculate: loading the teacher and the drafter, then {len(prompts)} prompt(s) "
              f"(after one untimed warm-up)", file=sys.stderr, flush=True)
        results = speculate(args.drafter, args.teacher, prompts, gamma=args.gamma,
                            steps=args.steps, trailing_masks=args.trailing_masks,
                            strategy=args.strategy, decoding=decoding,
                            draft_temperature=args.draft_temperature,
                            drafter_tokenizer=args.drafter_tokenizer,
                            teacher_tokenizer=args.teacher_tokenizer, seed=args.seed,
                            teacher_dtype=args.teacher_dtype,
                            verifier=args.verifier)
    except UserError:
        raise
    except (ValueError, FileNotFoundError) as err:  # a tokenizer or file the libraries refused
        raise SpeculateError(str(err)) from None
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if args.tensorboard:
        write_scalars(args.tensorboard, tensorboard_scalars(results))
    print(json.dumps(results["summary"], indent=2))  # for programs; the table for people
    print(reports.speculate_table(results["summary"]), file=sys.stderr)
    return 0
