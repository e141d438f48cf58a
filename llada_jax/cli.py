"""`llada-jax` console script: one subcommand per stage of the flow (DESIGN.md).

Each subcommand is a module of `llada_jax.commands` with `add_arguments(parser)` and
`run(args) -> int`; the library it drives lives in the package of its stage. A subcommand is listed here only
once it works end to end. User errors (`llada_jax.errors.UserError`) are caught here, once:
the message goes to stderr and the exit code is 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from data_pipeline.fileio import check_output
from llada_jax import platforms
from llada_jax.errors import UserError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "preprocess": ("llada_jax.commands.preprocess", "teacher-logit dumps -> aligned top-k TFDS dataset + report"),
    "import-hf": ("llada_jax.commands.import_hf", "HF LLaDA or LLaMA dir (safetensors) -> params checkpoint"),
    "export-hf": ("llada_jax.commands.export_hf", "params checkpoint -> HF LLaDA or LLaMA dir (safetensors)"),
    "train": ("llada_jax.commands.train", "fine-tune the student on teacher targets (resumes by itself)"),
    "eval": ("llada_jax.commands.eval", "drafter metrics (KL, top-1, acceptance, E(gamma)) on held-out data"),
    "demo": ("llada_jax.commands.demo", "the whole flow end to end on the built-in tiny default"),
    "generate-teacher": ("llada_jax.commands.generate_teacher", "causal teacher + prompts -> teacher logits (seed format)"),
    "speculate": ("llada_jax.commands.speculate", "LLaDA drafts, the teacher verifies: measured tokens per target call"),
    "collect": ("llada_jax.commands.collect", "decode with the drafter -> on-policy training records"),
    "onpolicy": ("llada_jax.commands.onpolicy", "offline training, then rounds of collect + train"),
}

# name -> the output flags (argparse dest, kind "dir" | "file") checked before any work starts.
OUTPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "preprocess": (("out", "dir"),),
    "import-hf": (("out", "dir"),),
    "export-hf": (("out", "dir"),),
    "train": (("workdir", "dir"),),
    "eval": (("out", "file"), ("tensorboard", "dir")),
    "demo": (("out", "dir"),),
    "generate-teacher": (("out", "file"), ("records", "dir")),
    "speculate": (("out", "file"), ("tensorboard", "dir")),
}
# Errors of the place being written, not of this program: said in one line, like a UserError.
WRITE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM)


def check_outputs(args: argparse.Namespace) -> None:
    for dest, kind in OUTPUTS.get(args.command, ()):
        if getattr(args, dest, None):
            check_output(getattr(args, dest), "--" + dest.replace("_", "-"), kind=kind)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
            prog="llada-jax",
            description="Align LLaDA as a speculative-decoding drafter for a LLaMA-style teacher.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from absl import logging as absl_logging  # orbax and grain log routine events as warnings

    absl_logging.set_verbosity(absl_logging.ERROR)
    # transformers serves tokenizers and configs here, without torch (not a dependency): its
    # "PyTorch was not found" advice at import is noise to a user of this CLI.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    platforms.choose()  # before any subcommand module starts JAX: no libtpu probe without a TPU
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args._module, "ACCEPTS_EXTRA", False):
        args._parser.error(f"unrecognized arguments: {' '.join(extra)}")  # its own usage
    args.extra = extra
    try:
        check_outputs(args)
        return int(args._module.run(args) or 0)
    except UserError as err:  # input to fix, not a bug: the message, no traceback
        print(f"llada-jax {args.command}: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        print(f"llada-jax {args.command}: {err.filename or 'an output'}: {err.strerror} "
              f"(free some space, or choose a place you can write)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C (train saves on the first): no traceback
        print(f"\nllada-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
