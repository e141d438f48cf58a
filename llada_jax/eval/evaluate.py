"""The student as a drafter on a preprocessed split, under the drafting condition.

For every held-out example a cut point c is drawn in its response (fixed seed): the prompt and
response[:c] stay visible, the rest is masked, and the student's predictions at offsets
0..gamma-1 after the cut are scored against the teacher's stored top-k: KL, top-1 agreement,
acceptance alpha (lower bound over the top-k, upper bound with the tail bucket) and E(gamma),
overall and by offset within the drafted block (`distill.metrics.evaluate_model`, the same
function train's periodic eval runs). `llada-jax eval` (commands/eval.py) runs it on a train
workdir, a params checkpoint or an HF LLaDA directory (e.g. the output of `export-hf`).
"""

from __future__ import annotations

from data_pipeline import loader as data_loader
from llada_jax.distill.metrics import evaluate_model
from llada_jax.errors import DataError


def evaluate_split(model, data_dir: str, split: str, eval_config, *, batch_size: int = 8,
                   seq_len: int | None = None, max_batches: int | None = None) -> dict:
    """`evaluate_model` over `split` of a preprocess output, one epoch in order, rows packed to
    `seq_len` (default: the dataset's longest example)."""
    meta = data_loader.read_metadata(data_dir)
    seq_len = seq_len or meta.max_length
    batches = data_loader.make_loader(data_dir, split, batch_size=batch_size, seq_len=seq_len,
                                      seed=0, shuffle=False, num_epochs=1, pack=True)
    results = evaluate_model(model, batches, eval_config, max_batches=max_batches)
    if not results:
        raise DataError(f"split {split!r} of {data_dir} has no examples; pick another --split "
                        f"({', '.join(sorted(meta.num_examples))}), or rebuild the dataset with "
                        f"a larger --validation-fraction")
    if not results["scored_positions"]:
        raise DataError(f"no response position was scored in split {split!r} "
                        f"({meta.num_examples.get(split, 0)} examples) with --seq-len {seq_len}: "
                        f"the prompts fill the rows, or the split is too small; raise --seq-len "
                        f"(examples are up to {meta.max_length} tokens) or use a larger split")
    return results


def check_data_fits(ckpt: str, data_dir: str, meta: data_loader.DatasetMeta) -> None:
    """A dataset made for another tokenizer than the checkpoint's scores nonsense (ids past the
    model's vocabulary give NaN): refused, as train refuses it."""
    from llada_jax.checkpoints import peek_config
    from llada_jax.tokenizer_checks import vocab_problem

    cfg = peek_config(ckpt)
    if cfg is None:
        return
    problem = vocab_problem(f"--data {data_dir} (made for the student tokenizer "
                            f"{meta.options.get('student_tokenizer')})", meta.student_vocab_size,
                            cfg, f"--ckpt {ckpt}")
    if problem:
        raise DataError(problem)
