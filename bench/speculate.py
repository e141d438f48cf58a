#!/usr/bin/env python3
"""Speculative decoding on the demo models: measured vs α-predicted tokens per target call, and
wall-clock speedup over teacher-only decoding in the same run.

    python bench/speculate.py [--drafter CKPT] [--data DEMO_OUT/data] [--gamma 1 4 8] \
        [--prompts 24] [--max-new-tokens 24] [--draft-step-ms 9 --target-step-ms 60]

--drafter defaults to the shipped pre-trained tiny LLaDA (pass e.g. `demo_out/run` for the
aligned one). With --data (a `preprocess` output whose student tokenizer is the demo's, e.g.
`demo_out/data` after `llada-jax demo`) the held-out prompts come from its validation records
and `eval`'s α-predicted E(γ) is printed beside the measurement; without it, the demo's eval
prompts are used and only measurements are shown. The wall clock here is tiny models on a CPU
with a recompute verifier: it says little about real speed. --draft-step-ms / --target-step-ms
(one drafter denoising step, one teacher verification call, measured on the real pair, e.g.
LLaDA-8B and Llama-3.3-70B on an accelerator) turn each measured tokens per call into a
projected speedup: tokens_per_call * t_target / (steps * t_draft + t_target).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchlib import load  # noqa: E402
from llada_jax.commands.demo import ASSETS  # noqa: E402
from data_pipeline.loader import prompt_texts  # noqa: E402
from llada_jax.checkpoints import load_model  # noqa: E402
from llada_jax.speculate import loop as sp  # noqa: E402

STUDENT_TOK, TEACHER_TOK = str(ASSETS / "student_tokenizer"), str(ASSETS / "teacher_tokenizer")


def predicted(drafter, data_dir: str, gammas: list[int]) -> dict[int, float]:
    """eval's E(γ) (lower bound, α over the teacher's top-k) on the validation split."""
    from llada_jax.eval.evaluate import evaluate_split
    from llada_jax.train import config as train_config

    eval_config = train_config.default_config().eval
    eval_config.gammas = tuple(gammas)
    results = evaluate_split(drafter, data_dir, "validation", eval_config)
    return {g: results[f"gamma={g}"]["E_lower"] for g in gammas}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--drafter", default=str(ASSETS / "student"))
    parser.add_argument("--data", default=None)
    parser.add_argument("--gamma", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--draft-step-ms", type=float, default=None)
    parser.add_argument("--target-step-ms", type=float, default=None)
    args = parser.parse_args()

    drafter = load_model(args.drafter)[1]
    teacher = load_model(ASSETS / "teacher", compute_dtype="float32")[1]
    if args.data:
        prompts = prompt_texts(args.data, "validation", STUDENT_TOK, args.prompts)
        expected = predicted(drafter, args.data, args.gamma)
    else:
        from llada_jax.teacher.prompts import read_prompts

        prompts = list(read_prompts([ASSETS / "prompts_eval.txt"]))[:args.prompts]
        expected = {}
    project = args.draft_step_ms is not None and args.target_step_ms is not None
    print(f"drafter {args.drafter}; {len(prompts)} prompts x {args.max_new_tokens} new tokens; "
          f"TLI, steps {args.steps}; {load()}")
    print("γ | mode | E(γ) predicted | measured tokens/call | mean accepted | spec tok/s | "
          "teacher-only tok/s | wall speedup" + (" | projected speedup" if project else ""))
    for gamma in args.gamma:
        for mode, decoding in (("greedy", sp.Decoding(args.max_new_tokens)),
                               ("T=1", sp.Decoding(args.max_new_tokens, greedy=False))):
            s = sp.speculate(args.drafter, None, prompts, gamma=gamma, steps=args.steps,
                             decoding=decoding, drafter_tokenizer=STUDENT_TOK,
                             teacher_tokenizer=TEACHER_TOK, drafter_model=drafter,
                             teacher_model=teacher)["summary"]
            pred = f"{expected[gamma]:.3f}" if gamma in expected else "-"
            row = (f"{gamma} | {mode} | {pred} | {s['tokens_per_target_call']:.3f} | "
                   f"{s['mean_accepted_per_block']:.3f} | {s['tokens_per_s']:.0f} | "
                   f"{s['teacher_only_tokens_per_s']:.0f} | {s['speedup']:.2f}x")
            if project:
                block_ms = args.steps * args.draft_step_ms + args.target_step_ms
                row += f" | {s['tokens_per_target_call'] * args.target_step_ms / block_ms:.2f}x"
            print(row)


if __name__ == "__main__":
    main()
