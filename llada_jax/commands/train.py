"""`llada-jax train`: fine-tune the student on teacher targets (train/trainer.py).

    llada-jax train --config tiny --workdir runs/tiny --config.data.dir=DATA

Resumes from the latest checkpoint in `--workdir` without being asked; on SIGTERM or Ctrl-C (or
at the JAX preemption sync point on TPU) saves a checkpoint and exits 0. One run per workdir (its
.lock names the holder); the run ends with a summary and WORKDIR/curves.png.
"""

from __future__ import annotations

import argparse
import pathlib

import jax

from llada_jax import checkpoints, reports, runtime
from llada_jax.train import config as train_config
from llada_jax.train.trainer import Trainer, workdir_lock

ACCEPTS_EXTRA = True  # --config.a.b=v overrides


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of runtime.maybe_initialize_distributed (multi-process runs off TPU)."""
    parser.add_argument("--coordinator-address", default=None,
                        help="multi-process runs off TPU: host:port of process 0")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)


def initialize_distributed(args: argparse.Namespace) -> None:
    runtime.maybe_initialize_distributed(args.coordinator_address, args.num_processes,
                                         args.process_id)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="a shipped config (" + ", ".join(train_config.shipped_configs())
                             + ") or a config file (path.py or path.py:variant)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics, TensorBoard")
    add_distributed_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no console progress bar")


def run(args: argparse.Namespace) -> int:
    config = train_config.load_config(args.config, args.extra)  # validated before anything runs
    initialize_distributed(args)
    with workdir_lock(args.workdir):  # before the trainer reads or compiles anything
        trainer = Trainer(config, args.workdir, progress=not args.no_progress)
        trainer.fit()
    if jax.process_index() == 0:
        workdir = pathlib.Path(args.workdir)
        reports.plot_curves(workdir / "metrics.jsonl", workdir / "curves.png")
        step = trainer.checkpointer_latest
        print(reports.train_summary(workdir, step, None if step is None else
                                    str(workdir / checkpoints.STEPS_DIR / str(step))))
    return 0
