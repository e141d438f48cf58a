"""`llada-jax eval`: how good a drafter the student is, under the drafting condition.

    llada-jax eval --ckpt CKPT --data DATA_DIR [--gamma 4 8 16] [--out eval.json]

For every held-out example a cut point c is drawn in its response (fixed seed): the prompt and
response[:c] stay visible, the rest is masked, and the student's predictions at offsets
0..gamma-1 after the cut are scored against the teacher's stored top-k: KL, top-1 agreement,
acceptance alpha (lower bound over the top-k, upper bound with the tail bucket) and E(gamma),
overall and by offset within the drafted block. CKPT is a train workdir, a params checkpoint or
an HF LLaDA directory (e.g. the output of `export-hf`).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import pathlib
import sys

import jax
import numpy as np
from flax import nnx

from data_pipeline import loader as data_loader
from llada_jax import reports
from llada_jax.errors import CheckpointError, DataError, UserError
from llada_jax.train import config as train_config
from llada_jax.train import masking
from llada_jax.eval import metrics, speculate
from llada_jax.checkpoints import load_model


@functools.partial(jax.jit, static_argnames=("graphdef", "gamma", "mask_token_id", "chunk_size"))
def _metric_sums(graphdef, params, batch, seed, *, gamma: int, mask_token_id: int,
                 chunk_size: int):
    model = nnx.merge(graphdef, params)
    noisy, offset = masking.drafting_batch(batch, jax.random.key(seed), gamma,
                                           mask_token_id=mask_token_id)
    hidden = model(noisy, positions_bl=batch["positions"], segment_ids_bl=batch["segment_ids"],
                   return_hidden=True)
    return metrics.drafter_metric_sums(hidden, model.lm_head_weight(), batch["teacher_ids"],
                                       batch["teacher_logprobs"], offset, gamma=gamma,
                                       chunk_size=chunk_size)


def evaluate_model(model, batches, eval_config, *, max_batches: int | None = None) -> dict:
    """Metric means of `model` over `batches` (an iterable of batch dicts, global arrays or
    NumPy): `metrics.summarize` output plus 'overall' (offsets < max(gammas)) and the number of
    scored positions; {} when there is no batch. eval_config: the config's `eval` section
    (gammas, seed of the cut points, chunk_size)."""
    graphdef, params = nnx.split(model)
    gammas = tuple(eval_config.gammas)
    gamma = max(gammas)
    totals = None
    for i, batch in enumerate(itertools.islice(batches, max_batches)):
        sums = _metric_sums(graphdef, params, batch, eval_config.seed + i, gamma=gamma,
                            mask_token_id=model.cfg.mask_token_id,
                            chunk_size=eval_config.chunk_size)
        sums = jax.device_get(sums)
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    if totals is None:
        return {}
    out = metrics.summarize(totals, gammas)
    out["overall"] = {k: v for k, v in out[f"gamma={gamma}"].items() if v is not None}
    out["scored_positions"] = float(np.sum(totals["count"]))
    return out


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
    speculate.add_eval_arguments(parser)


def check_data_fits(ckpt: str, data_dir: str, meta: data_loader.DatasetMeta) -> None:
    """A dataset made for another tokenizer than the checkpoint's scores nonsense (ids past the
    model's vocabulary give NaN): refused, as train refuses it."""
    from llada_jax.checkpoints import peek_config
    from llada_jax.tokenizer_checks import student_kind_problem, vocab_problem

    cfg = peek_config(ckpt)
    if cfg is None:
        return
    if problem := student_kind_problem(f"--ckpt {ckpt}", cfg):
        raise CheckpointError(problem)
    problem = vocab_problem(f"--data {data_dir} (made for the student tokenizer "
                            f"{meta.options.get('student_tokenizer')})", meta.student_vocab_size,
                            cfg, f"--ckpt {ckpt}")
    if problem:
        raise DataError(problem)


def run(args: argparse.Namespace) -> int:
    small = [f"--{name.replace('_', '-')} must be at least 1 (got {value})"
             for name, value in (("batch_size", args.batch_size), ("seq_len", args.seq_len),
                                 ("max_batches", args.max_batches), ("gamma", min(args.gamma)))
             if value is not None and value < 1]
    if small:
        raise UserError("; ".join(small))
    meta = data_loader.read_metadata(args.data)  # the cheap checks first
    check_data_fits(args.ckpt, args.data, meta)
    print(f"eval: loading {args.ckpt}, then scoring split {args.split!r} "
          f"({meta.num_examples.get(args.split, 0)} examples)", file=sys.stderr, flush=True)
    _, model = load_model(args.ckpt)
    seq_len = args.seq_len or meta.max_length
    batches = data_loader.make_loader(args.data, args.split, batch_size=args.batch_size,
                                      seq_len=seq_len, seed=0, shuffle=False, num_epochs=1,
                                      pack=True)
    eval_config = train_config.default_config().eval
    eval_config.update(gammas=tuple(args.gamma), seed=args.seed)
    if args.chunk_size:
        eval_config.chunk_size = args.chunk_size
    results = evaluate_model(model, reports.progress(batches, "eval", "batch", args.max_batches),
                             eval_config, max_batches=args.max_batches)
    if not results:
        raise DataError(f"split {args.split!r} of {args.data} has no examples; pick another "
                        f"--split ({', '.join(sorted(meta.num_examples))}), or rebuild the "
                        f"dataset with a larger --validation-fraction")
    if not results["scored_positions"]:
        raise DataError(f"no response position was scored in split {args.split!r} "
                        f"({meta.num_examples.get(args.split, 0)} examples) with --seq-len "
                        f"{seq_len}: the prompts fill the rows, or the split is too small; raise "
                        f"--seq-len (examples are up to {meta.max_length} tokens) or use a "
                        f"larger split")
    if args.teacher:
        speculate.measured_for_eval(args, model, results)
    text = json.dumps(results, indent=2)
    print(text)  # for programs; people read the table (stderr, as preprocess's summary)
    print(reports.eval_table(results), file=sys.stderr)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    if args.tensorboard:
        from tensorboardX import SummaryWriter

        with SummaryWriter(args.tensorboard) as writer:
            for name, value in results["overall"].items():
                writer.add_scalar(f"eval/{name}", value, 0)
    return 0
