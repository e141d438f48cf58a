"""`llada-jax onpolicy`: offline training, then rounds of collect + train, in one workdir.

    llada-jax onpolicy --config tiny --workdir runs/op --rounds 2 --steps-per-round 100 \\
        --teacher LLAMA --config.data.dir=DATA --config.train.num_steps=400

train.num_steps counts every update: here 200 offline, then 2 rounds of 100. Rerun the same
command after a kill (at any point) to resume. Other settings: --config.onpolicy.FIELD=VALUE
(train/config.py).
"""

from __future__ import annotations

import argparse

from llada_jax.commands.train import add_config_argument
from llada_jax.onpolicy import rounds
from llada_jax.train import config as train_config

ACCEPTS_EXTRA = True  # --config.a.b=v overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--workdir", required=True, help="the rounds' records and the training")
    parser.add_argument("--rounds", type=int, default=None, help="config.onpolicy.rounds")
    parser.add_argument("--steps-per-round", type=int, default=None,
                        help="config.onpolicy.steps_per_round")
    parser.add_argument("--teacher", default=None, help="config.onpolicy.teacher")
    parser.add_argument("--prompts", default=None,
                        help="config.onpolicy.prompts (default: data.dir's training prompts)")
    parser.add_argument("--no-progress", action="store_true", help="no console progress bar")


def run(args: argparse.Namespace) -> int:
    flags = {"rounds": args.rounds, "steps_per_round": args.steps_per_round,
             "teacher": args.teacher, "prompts": args.prompts}
    overrides = [f"--config.onpolicy.{k}={v}" for k, v in flags.items() if v is not None]
    config = train_config.load_config(args.config, overrides + args.extra)
    rounds.plan(config)  # its errors before anything runs
    rounds.run_rounds(config, args.workdir, progress=not args.no_progress,
                      log=lambda msg: print(f"llada-jax onpolicy: {msg}", flush=True))
    return 0
