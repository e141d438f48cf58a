"""`llada-jax speculate`: LLaDA drafts, the causal teacher verifies, measured tokens per target call.

    llada-jax speculate --drafter CKPT_or_HF --teacher CKPT_or_HF --prompts FILE \\
        [--drafter-tokenizer DIR] [--teacher-tokenizer DIR] --gamma 4 --steps 1 \\
        --strategy tli|string [--temperature T | --greedy] [--out results.json]

The decoding itself is `llada_jax.speculate.loop.speculate`. γ, steps and trailing masks
default to the drafter's serving contract (drafter_contract.json, written by `train` and carried
by `export-hf`); a run with other settings, another teacher tokenizer or vocabulary map than the
drafter was trained for prints one warning line each.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys

from llada_jax import drafter_contract, reports
from llada_jax.errors import SpeculateError, UserError
from llada_jax.metrics_writer import write_scalars
from llada_jax.speculate.loop import DEFAULTS, Decoding, speculate, tensorboard_scalars
from llada_jax.speculate.verify import VERIFIERS
from llada_jax.speculate.vocab_bridge import STRATEGIES
from llada_jax.teacher.prompts import read_prompts


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """The models, prompts and draft shape (speculate and collect)."""
    parser.add_argument("--drafter", required=True, help="LLaDA: params checkpoint, workdir or HF dir")
    parser.add_argument("--teacher", required=True, help="causal teacher checkpoint or HF dir")
    parser.add_argument("--drafter-tokenizer", help="default: the --drafter directory")
    parser.add_argument("--teacher-tokenizer", help="default: the --teacher directory")
    parser.add_argument("--prompts", required=True, nargs="+",
                        help="text (one prompt a line), .jsonl or .json with \"prompt\" fields")
    parser.add_argument("--max-prompts", type=int, default=None)
    parser.add_argument("--gamma", type=int, default=None,
                        help=f"drafted tokens per block (default: the drafter's "
                             f"{drafter_contract.FILE}, else {DEFAULTS['gamma']})")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"denoising steps per block (default: the contract's, else "
                             f"{DEFAULTS['steps']})")
    parser.add_argument("--trailing-masks", type=int, default=None,
                        help=f"masks after the block (never filled): text goes on (default: the "
                             f"contract's, else {DEFAULTS['trailing_masks']})")


def resolve_draft_shape(args: argparse.Namespace):
    """Fills --gamma / --steps / --trailing-masks left unset from the drafter's serving contract
    (else DEFAULTS); returns the contract (None: the drafter has none)."""
    record = drafter_contract.find(args.drafter)  # None: an export older than the record
    for name, default in DEFAULTS.items():
        setattr(args, name, drafter_contract.resolve(getattr(args, name), record, name, default))
    return record


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_decoding_arguments(parser)
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
    engine = parser.add_argument_group("the compiled engine (strategy tli)")
    engine.add_argument("--batch-size", type=int, default=8, help="prompts decoded at once")
    engine.add_argument("--drafter-cache", choices=("none", "prefix"), default="none",
                        help="prefix: keep the verified prefix's keys/values (Fast-dLLM); "
                             "the drafter runs only the new tokens + masks against them")
    engine.add_argument("--refresh-every", type=int, default=8,
                        help="prefix cache: a full drafter forward every N blocks")
    engine.add_argument("--refresh-tokens", type=int, default=64,
                        help="prefix cache: ... or once the prefix grew by N tokens")
    engine.add_argument("--draft-confidence", type=float, default=None,
                        help="stop a draft at the first position whose top probability < C")
    engine.add_argument("--no-baseline", action="store_true",
                        help="skip the teacher-only run (no speedup in the results)")
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
    if getattr(args, "batch_size", 1) < 1 or getattr(args, "refresh_every", 1) < 1 \
            or getattr(args, "refresh_tokens", 1) < 1:
        problems.append("need --batch-size, --refresh-every and --refresh-tokens >= 1")
    confidence = getattr(args, "draft_confidence", None)
    if confidence is not None and not 0 <= confidence <= 1:
        problems.append("--draft-confidence must lie in [0, 1]")
    return problems


def _warn(record, served) -> None:
    for line in drafter_contract.mismatches(record, served):
        print(f"speculate: warning: {line}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    record = resolve_draft_shape(args)
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
                            verifier=args.verifier, baseline=not args.no_baseline,
                            on_served=functools.partial(_warn, record),
                            engine=dict(batch_size=args.batch_size,
                                        drafter_cache=args.drafter_cache,
                                        refresh_every=args.refresh_every,
                                        refresh_tokens=args.refresh_tokens,
                                        draft_confidence=args.draft_confidence))
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
