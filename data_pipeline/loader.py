"""grain pipeline: stored examples -> packed, fixed-shape batches (`data_pipeline/batch.py`).

    it = make_loader(data_dir, "train", batch_size=B, seq_len=L, top_k=K, seed=0)
    batch = next(it)          # dict of numpy arrays, B / shard_count rows of length L
    state = it.get_state()    # JSON-able; it.set_state(state) resumes exactly there
    meta = read_metadata(data_dir)   # top_k, max_length, examples per split, tokenizer info

`make_loader(data_dir, split, *, batch_size, seq_len, top_k=None, seed=0, num_epochs=None,
shuffle=True, shard_index=None, shard_count=None, pack=True, num_packing_bins=None,
prefetch=2) -> grain DatasetIterator`:
- data_dir: the `--out` of `llada-jax preprocess` (or its teacher_targets/1.0.0 directory);
- batch_size: GLOBAL rows; each host yields batch_size / shard_count rows;
- shard_index / shard_count: default jax.process_index() / jax.process_count(); the host takes
  every shard_count-th example of the split, then shuffles its share (seed, reshuffled per epoch);
- num_epochs None: repeat forever (only full batches); a finite count ends with a last batch
  padded by empty rows (segment_ids 0, target_mask False) so shapes never change;
- pack: first-fit packing of several examples per row (segment_ids 1..n, positions restart at 0
  per example), else one example per row; examples longer than seq_len are cut to seq_len;
- top_k (K): teacher slots per position; default the dataset's top_k. Smaller K keeps the K
  largest (renormalised again where the dataset stored renormalised top-5).

The batch's fields, dtypes and pad values are `batch.FIELDS`.
The iterator state is grain's, so `grain.checkpoint.CheckpointSave(it)` /
`CheckpointRestore(it)` store it inside an orbax CheckpointManager.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import grain
import numpy as np

from data_pipeline import alignment
from data_pipeline import batch as batch_lib
from data_pipeline import records
from data_pipeline.errors import DataError

_PAD = {k: batch_lib.PAD[k] for k in batch_lib.EXAMPLE_FIELDS}  # before packing
# Special tokens the trainer looks for when the config names none (the first one present wins).
MASK_TOKENS = ("<|mdm_mask|>", "<|mask|>", "[MASK]", "<mask>")
EOS_TOKENS = ("<|eot_id|>", "<|endoftext|>", "<|eot|>", "</s>", "<eos>")


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
    top_k: int
    max_length: int
    student_vocab_size: int
    alignment_mode: str
    num_examples: dict[str, int]
    options: dict
    # The student tokenizer's added tokens (text -> id) and the stored tokens per split (prompt +
    # response); None for a dataset written before preprocess recorded them (it still loads).
    special_tokens: dict[str, int] | None
    num_tokens: dict[str, int] | None

    def mask_and_eos_ids(self, mask_token: str = "") -> tuple[int, int | None]:
        """(mask id, eos id or None) of the student tokenizer: `mask_token` if given, else the
        first of MASK_TOKENS it has."""
        self.require_facts()
        candidates = (mask_token,) if mask_token else MASK_TOKENS
        mask_id = next((self.special_tokens[t] for t in candidates if t in self.special_tokens),
                       None)
        if mask_id is None:
            raise DataError(f"the student tokenizer {self.options['student_tokenizer']} has "
                             f"none of the mask tokens {candidates} among its special tokens; "
                             "set --config.model.mask_token to its mask token")
        eos_id = next((self.special_tokens[t] for t in EOS_TOKENS if t in self.special_tokens),
                      None)
        return mask_id, eos_id
    record_format: int = 1  # records.FORMATS; datasets written before formats had none

    def require_facts(self) -> None:
        """Training needs the special tokens and token counts preprocess now records."""
        if self.special_tokens is None or self.num_tokens is None:
            raise DataError(f"the dataset written with options {self.options} predates the "
                            "special_tokens / num_tokens metadata that training reads: re-run "
                            "`llada-jax preprocess` with --overwrite")


def read_metadata(data_dir: str) -> DatasetMeta:
    info = records.read_info(data_dir)
    m = info.metadata
    return DatasetMeta(int(m["top_k"]), int(m["max_length"]), int(m["student_vocab_size"]),
                       m["alignment_mode"], {s: info.splits[s].num_examples for s in info.splits},
                       dict(m["options"]),
                       dict(m["special_tokens"]) if "special_tokens" in m else None,
                       _num_tokens(data_dir, m), int(m.get("record_format", 1)))


def _num_tokens(data_dir: str, metadata) -> dict[str, int] | None:
    """Tokens per split. A dataset written before they were counted as tokens
    (records.NUM_TOKENS_UNIT) holds the int32 bytes of its tokens on the local route: 4 each."""
    if "num_tokens" not in metadata:
        return None
    counts = {s: int(n) for s, n in metadata["num_tokens"].items()}
    if metadata.get(records.NUM_TOKENS_UNIT) == "tokens":
        return counts
    report_path = os.path.join(records.dataset_dir(data_dir), "report.json")
    try:
        with open(report_path, encoding="utf-8") as f:
            beam = json.load(f).get("beam_runner")
    except (OSError, ValueError):
        raise DataError(f"{data_dir} predates exact token counts and its report.json cannot be "
                        f"read ({report_path}); re-run `llada-jax preprocess` with --overwrite"
                        ) from None
    return counts if beam else {s: n // 4 for s, n in counts.items()}


def shard_problem(batch_size: int, num_shards: int, num_processes: int) -> str | None:
    """Why `num_shards` data shards (0: one per process) cannot feed `num_processes` processes
    with global batches of `batch_size` rows, or None. The one check, used at config load
    (train/config.validate) and here."""
    num_shards = num_shards or num_processes
    if num_shards % num_processes or batch_size % num_shards:
        return (f"data.num_shards={num_shards} must be a multiple of the {num_processes} "
                f"processes and divide data.global_batch_size={batch_size}")
    return None


def host_shards(batch_size: int, num_shards: int | None = None) -> tuple[int, range]:
    """(number of data shards, the ones this process reads): `num_shards` (default one per
    process) split evenly over the processes; each shard gives batch_size / num_shards rows of
    every global batch (make_loader's shard_index / shard_count)."""
    import jax

    if problem := shard_problem(batch_size, num_shards or 0, jax.process_count()):
        raise DataError(problem)
    num_shards = num_shards or jax.process_count()
    per_host = num_shards // jax.process_count()
    return num_shards, range(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)


class HostShards:
    """Concatenates the rows of this host's data shards into its part of the global batch.

    The data is split into `data.num_shards` disjoint shards (default: one per process), so a
    run's global batches do not depend on how many processes read them: 2 processes x 1 shard
    and 1 process x 2 shards see the same batches. Checkpointable through grain's orbax handler
    (get_state/set_state as bytes, one file per process).
    """

    def __init__(self, iterators):
        self.iterators = iterators

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> bytes:
        return json.dumps([it.get_state() for it in self.iterators]).encode()

    def set_state(self, state: bytes) -> None:
        states = json.loads(state)
        if len(states) != len(self.iterators):
            raise DataError(f"the checkpoint's data iterator has {len(states)} shard(s) on this "
                              f"process, the run has {len(self.iterators)}: keep data.num_shards "
                              f"and the process count when resuming")
        for it, st in zip(self.iterators, states):
            it.set_state(st)

    def start_prefetch(self) -> None:
        pass


def make_loader(data_dir: str, split: str, *, batch_size: int, seq_len: int,
                top_k: int | None = None, seed: int = 0, num_epochs: int | None = None,
                shuffle: bool = True, shard_index: int | None = None,
                shard_count: int | None = None, pack: bool = True,
                num_packing_bins: int | None = None, prefetch: int = 2,
                mix: Sequence[tuple[str, float]] = ()):
    """`mix`: ((data_dir, weight), ...) to read instead of `data_dir` (whose metadata still
    gives the default top_k): each dataset's share of the host's examples, shuffled on its own
    and repeated forever (num_epochs is ignored), mixed in proportion to the weights by grain's
    index arithmetic, so the mixture is as deterministic and resumable as one dataset."""
    if shard_index is None or shard_count is None:
        import jax
        shard_index, shard_count = jax.process_index(), jax.process_count()
    if batch_size % shard_count:
        raise DataError(f"global batch_size {batch_size} is not divisible by the "
                         f"{shard_count} hosts")
    rows = batch_size // shard_count
    top_k = top_k or read_metadata(data_dir).top_k

    def source(path: str) -> grain.MapDataset:
        ds = grain.MapDataset.source(records.open_split(path, split))[shard_index::shard_count]
        if len(ds) == 0:
            raise DataError(f"{path}: split {split!r} has no examples for host {shard_index} "
                             f"of {shard_count}")
        return ds.shuffle(seed=seed) if shuffle else ds

    if mix:
        ds = grain.MapDataset.mix([source(path).repeat(None) for path, _ in mix],
                                  [weight for _, weight in mix])
    else:
        ds = source(data_dir).repeat(num_epochs)
    ds = ds.map(lambda ex: to_positions(ex, top_k, seq_len))
    # A short read-ahead: grain's default (16 threads, 500 elements) polls every pending read
    # on each step, which cost a third of the loader's time (1.5x throughput with this).
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=64))
    if pack:
        it = grain.experimental.FirstFitPackIterDataset(
            it, length_struct={k: seq_len for k in _PAD}, num_packing_bins=num_packing_bins or rows,
            shuffle_bins=False, padding_struct=_PAD)
        it = it.map(_from_packed)
    else:
        it = it.map(lambda ex: _pad_row(ex, seq_len))
    it = it.batch(rows, drop_remainder=num_epochs is None).map(lambda b: _pad_batch(b, rows))
    if prefetch:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
    return iter(it)


def to_positions(example: dict, top_k: int, seq_len: int) -> dict[str, np.ndarray]:
    """A stored example -> per-token arrays [n] / [n, K] (n = min(len, seq_len))."""
    n = min(len(example["tokens"]), seq_len)
    mask = records.target_mask(example)
    ids = np.zeros((len(mask), top_k), np.int32)
    logprobs = np.full((len(mask), top_k), -np.inf, np.float32)
    k = min(top_k, example["teacher_ids"].shape[1])
    ids[mask, :k] = example["teacher_ids"][:, :k]
    logprobs[mask, :k] = example["teacher_logprobs"][:, :k]
    if k < example["teacher_ids"].shape[1] and not example["tail_known"]:
        with np.errstate(divide="ignore", invalid="ignore"):  # rows without targets stay -inf
            norm = np.log(np.exp(logprobs).sum(-1, keepdims=True))
            logprobs = np.where(mask[:, None], logprobs - norm, logprobs)
    return {"tokens": example["tokens"][:n].astype(np.int32),
            "prompt_mask": np.arange(n) < example["prompt_length"],
            "target_mask": mask[:n], "teacher_ids": ids[:n], "teacher_logprobs": logprobs[:n]}


def _from_packed(packed: dict) -> dict[str, np.ndarray]:
    row = {k: packed[k] for k in _PAD}
    row["segment_ids"] = packed["tokens_segment_ids"].astype(np.int32)
    row["positions"] = packed["tokens_positions"].astype(np.int32)
    return row


def _pad_row(ex: dict, seq_len: int) -> dict[str, np.ndarray]:
    n = len(ex["tokens"])
    row = {k: _pad_to(v, seq_len, _PAD[k]) for k, v in ex.items()}
    row["segment_ids"] = _pad_to(np.ones(n, np.int32), seq_len, 0)
    row["positions"] = _pad_to(np.arange(n, dtype=np.int32), seq_len, 0)
    return row


def _pad_to(x: np.ndarray, length: int, value) -> np.ndarray:
    out = np.full((length,) + x.shape[1:], value, x.dtype)
    out[:len(x)] = x
    return out


def _pad_batch(batch: dict, rows: int) -> dict[str, np.ndarray]:
    """Fills a short last batch with empty rows (segment_ids 0)."""
    return {k: _pad_to(v, rows, batch_lib.PAD[k]) if len(v) < rows else v
            for k, v in batch.items()}


def prompt_texts(data_dir: str, split: str, student_tokenizer: str,
                         limit: int | None = None) -> list[str]:
    """The prompt texts of a preprocessed split (its records' prompt tokens, decoded): held-out
    prompts for measuring a drafter on the examples `eval` scores."""
    vocab = alignment.Vocab.from_tokenizer(alignment.load_tokenizer(student_tokenizer))
    source = records.open_split(data_dir, split)
    out = []
    for i in range(len(source) if limit is None else min(limit, len(source))):
        ex = source[i]
        raw = b"".join(vocab.id_bytes[t] or b"" for t in ex["tokens"][:int(ex["prompt_length"])])
        out.append(raw.decode("utf-8", errors="replace"))
    return out
