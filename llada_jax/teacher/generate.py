"""Teacher-logit generation: a causal LLaMA-style LM continues prompts, its distributions recorded.

    llada-jax generate-teacher --teacher CKPT --tokenizer TOK_DIR --prompts prompts.txt \
        --out teacher.jsonl [--max-new-tokens 64] [--greedy | --temperature 0.8 --top-p 0.95] \
        [--full-logits] [--batch-size 8] [--chat-template]

Writes the seed format (DESIGN.md "Data contract"), one object per prompt:
`{prompt, response, logits: [{position, chosen_token, chosen_token_id, top_5: [{token, token_id,
logit}], full_logits}]}`. Entry i is the teacher's next-token distribution BEFORE it emitted
response token i (DESIGN.md "No shift"); `full_logits` (length vocab_size) only with
--full-logits. Token strings are the tokenizer's decode of that one id, and `response` is the
decode of the generated ids, the stop token included, so decoding the chosen ids gives it back.

`prompt` is the prompt text as given; the teacher tokenizer adds its own BOS (LLaMA-3's
post-processor does). With --chat-template the prompt becomes the tokenizer's chat template
applied to one user message (BOS and headers as text), and that text is the record's `prompt`.

Rows are left-padded to a fixed length per batch (positions start at 0 at each row's first real
token, padding hidden); the prompts are prefilled into a KV cache once and every new token is
one cached step (decode/cached.py), compiled once per prompt-length bucket.
Output is streamed (JSONL line by line; a JSON array element by element), so memory stays
bounded by one batch. Several processes (--coordinator-address ..., or a TPU slice): each
generates its share of the prompts, with --mesh one teacher sharded over all of them
(hosts.py), and process 0 writes the file.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import pathlib
from collections.abc import Iterable, Iterator, Sequence

import jax
import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llada_jax import reports
from llada_jax import sharding
from llada_jax.checkpoints import checkpoint_kind, load_model
from llada_jax.decode.buckets import PROMPT_BUCKET
from llada_jax.decode.cached import CachedLM
from llada_jax.decode.sampling import sample_next
from llada_jax.errors import GenerateError, UserError
from llada_jax.model.modeling import LLaDAModel
from llada_jax.teacher import hosts
from llada_jax.teacher.prompts import nonempty, prompt_ids, read_prompts
from llada_jax.teacher.seed_format import TokenText, checked_out_path, to_record, write_records
from llada_jax.tokenizer_checks import vocab_problem

TOP_K = 5


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; otherwise softmax(logits / temperature) cut to the top-p nucleus."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


# ----------------------------------------------------------------------------- decoding

@functools.partial(jax.jit, static_argnames=("vocab_size", "temperature", "top_p", "full_logits"))
def pick(logits_bv, key_data, *, vocab_size: int, temperature: float, top_p: float,
         full_logits: bool = True):
    """The next token of every row from its logits (embedding padding cut to vocab_size):
    (chosen [B], top_ids [B, K], top_logits [B, K], logits_bv float32 [B, vocab_size] or None
    unless full_logits), replicated under a mesh (hosts.py: every process sees every row).
    `key_data`: the raw uint32 data of a jax.random key (a host array every process passes)."""
    logits_bv = logits_bv[:, :vocab_size]
    top_logits, top_ids = jax.lax.top_k(logits_bv, TOP_K)
    chosen = sample_next(logits_bv, jax.random.wrap_key_data(key_data), temperature, top_p)
    replicated = lambda x: sharding.constrain(x, (None,) * x.ndim)
    return (replicated(chosen), replicated(top_ids), replicated(top_logits),
            replicated(logits_bv) if full_logits else None)


@dataclasses.dataclass
class Row:
    ids: list[int] = dataclasses.field(default_factory=list)
    entries: list[tuple] = dataclasses.field(default_factory=list)  # (top_ids, top_logits, full)
    done: bool = False


def generate_batch(model: LLaDAModel, ids_per_prompt: list[list[int]], sampling: Sampling,
                   stop_ids: set[int], pad_id: int, vocab_size: int, key: jax.Array,
                   batch_size: int, full_logits: bool,
                   mesh: jax.sharding.Mesh | None = None) -> list[Row] | None:
    """Continues each prompt (<= batch_size of them) until a stop id or max_new_tokens:
    one prefill of the left-padded prompts, then one cached step per token (decode.py).

    With a mesh over several processes every process calls this together: one global batch
    of batch_size rows per process, the same key and steps everywhere (hosts.py), and each
    gets its own rows back; None when no process has a prompt (also for no prompts at all)."""
    layout = hosts.layout_batch(ids_per_prompt, batch_size, pad_id, PROMPT_BUCKET,
                                hosts.spans_processes(mesh))
    if layout is None:
        return None
    lm = CachedLM(model, len(layout.pads), layout.tokens.shape[1] + sampling.max_new_tokens, mesh)
    rows = [Row() for _ in ids_per_prompt]
    done = ~layout.real  # rows with no prompt of their own never hold back the stop
    stop = np.array(sorted(stop_ids), np.int64)
    logits_bv = lm.prefill(layout.tokens, layout.pads)
    for step in range(sampling.max_new_tokens):
        key, sub = jax.random.split(key)
        with lm.mesh_context():
            chosen_b, top_ids, top_logits, logits = pick(
                    logits_bv, lm.put(np.asarray(jax.random.key_data(sub))), vocab_size=vocab_size,
                    temperature=sampling.temperature, top_p=sampling.top_p,
                    full_logits=full_logits)
        if step + 1 < sampling.max_new_tokens:  # dispatched before this step's results are read
            logits_bv = lm.extend(chosen_b[:, None])[:, 0]
        chosen = np.asarray(chosen_b)  # every row's: the stop test is the same on every process
        top_ids, top_logits = (hosts.own_rows(x, layout.own) for x in (top_ids, top_logits))
        logits = hosts.own_rows(logits, layout.own) if full_logits else None
        for r, row in enumerate(rows):
            if row.done:
                continue
            row.ids.append(int(chosen[layout.own.start + r]))
            row.entries.append((top_ids[r], top_logits[r], None if logits is None else logits[r]))
            row.done = row.ids[-1] in stop_ids
        done |= np.isin(chosen, stop)
        if done.all():
            break
    return rows


# ----------------------------------------------------------------------------- records

def generate_records(model: LLaDAModel, tokenizer: PreTrainedTokenizerBase, prompts: Iterable[str],
                     sampling: Sampling = Sampling(), **options) -> Iterator[dict]:
    """Seed-format records, one per prompt, in prompt order (options: see generate_rows)."""
    token_text = TokenText(tokenizer)
    for text, row in generate_rows(model, tokenizer, prompts, sampling, **options):
        yield to_record(text, row, tokenizer, token_text)


def generate_rows(model: LLaDAModel, tokenizer: PreTrainedTokenizerBase, prompts: Iterable[str],
                  sampling: Sampling = Sampling(), **options) -> Iterator[tuple[str, Row]]:
    """(prompt text, generated row) per prompt, in prompt order (options: generate_batches's)."""
    for batch in generate_batches(model, tokenizer, prompts, sampling, **options):
        yield from batch


def generate_batches(model: LLaDAModel, tokenizer: PreTrainedTokenizerBase, prompts: Iterable[str],
                     sampling: Sampling = Sampling(), *, batch_size: int = 8,
                     full_logits: bool = False, chat_template: bool = False,
                     mesh: jax.sharding.Mesh | None = None,
                     numbers: Iterable[int] | None = None) -> Iterator[list[tuple[str, Row]]]:
    """(prompt text, generated row) for each batch of `batch_size` prompts, in prompt order
    (rows over the mesh's data axes, heads over `tensor`, when `mesh` is given). With a mesh
    over several processes each batch is one collective step (hosts.py): a process whose
    prompts are done takes part with an empty batch until every process's are. `numbers`:
    the prompts' numbers in error messages (default 0, 1, ...; a process's share: its own)."""
    cfg = model.cfg
    if not cfg.causal:
        raise GenerateError("the teacher checkpoint is not causal (config.json llada_jax.causal "
                            "is false); generate-teacher needs a causal LM")
    if problem := vocab_problem("--tokenizer", len(tokenizer), cfg, "the teacher"):
        raise GenerateError(problem)
    model_eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, tuple) else (cfg.eos_token_id,)
    stop_ids = {i for i in (tokenizer.eos_token_id, *model_eos) if i is not None}
    pad_id = next((i for i in (tokenizer.pad_token_id, cfg.pad_token_id) if i is not None), 0)
    key = jax.random.key(sampling.seed)
    collective = hosts.spans_processes(mesh)
    numbered = zip(itertools.count() if numbers is None else numbers, prompts)
    while True:
        batch, error = [], None
        try:
            for index, prompt in itertools.islice(numbered, batch_size):
                text, ids = prompt_ids(tokenizer, prompt, chat_template)
                if len(ids) + sampling.max_new_tokens > cfg.max_sequence_length:
                    raise GenerateError(f"prompt {index} has {len(ids)} tokens; with "
                                        f"--max-new-tokens {sampling.max_new_tokens} that passes "
                                        f"the teacher's max_sequence_length "
                                        f"{cfg.max_sequence_length}: shorten it")
                batch.append((text, ids))
        except GenerateError as e:
            error = e
        if collective:  # a process that stopped alone would leave the others waiting
            hosts.raise_together(error)
        elif error:
            raise error
        if not batch and not collective:
            return
        key, sub = jax.random.split(key)
        rows = generate_batch(model, [ids for _, ids in batch], sampling, stop_ids, pad_id,
                              cfg.vocab_size, sub, batch_size, full_logits, mesh)
        if rows is None:
            return
        yield [(text, row) for (text, _), row in zip(batch, rows)]


def load_teacher(teacher: str | pathlib.Path, tokenizer_dir: str | pathlib.Path | None = None,
                 dtype: str = "float32", mesh: jax.sharding.Mesh | None = None,
                 ) -> tuple[LLaDAModel, PreTrainedTokenizerBase]:
    """The teacher (params and compute in `dtype`, sharded over `mesh`) and its tokenizer.

    `teacher` is a params checkpoint (import-hf / train) or an HF model directory (LLaMA:
    config.json + safetensors, read tensor by tensor as import-hf does); the tokenizer defaults
    to the HF directory's own.
    """
    teacher = pathlib.Path(teacher)
    tokenizer_dir = tokenizer_dir or teacher
    if tokenizer_dir == teacher and checkpoint_kind(teacher) == "params":
        raise GenerateError(f"--tokenizer is needed: {teacher} is a params checkpoint, which "
                            f"holds no tokenizer")
    try:
        _, model = load_model(teacher, mesh=mesh, dtype=dtype, compute_dtype=dtype, causal=True)
    except UserError as e:
        raise GenerateError(f"--teacher {teacher}: {e}") from e
    if not pathlib.Path(tokenizer_dir, "tokenizer_config.json").is_file():
        raise GenerateError(f"--tokenizer {tokenizer_dir} is not an HF tokenizer directory (no "
                            f"tokenizer_config.json); pass the teacher's local tokenizer dir")
    return model, AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


def generate_teacher(teacher: str | pathlib.Path, tokenizer: str | pathlib.Path | None,
                     prompts: Sequence[str | pathlib.Path], out: str | pathlib.Path,
                     sampling: Sampling = Sampling(), *, dtype: str = "float32",
                     mesh: jax.sharding.Mesh | None = None, overwrite: bool = False,
                     **options) -> int:
    """The subcommand as a function (the demo calls it); `options` go to generate_records.
    Several processes: each generates its share and process 0 writes `out` (others return 0).
    An existing `out` is refused unless `overwrite`."""
    checked_out_path(out, overwrite)
    texts = nonempty(read_prompts(prompts), prompts)  # checked before the teacher loads
    model, tok = load_teacher(teacher, tokenizer, dtype, mesh)
    if jax.process_count() == 1:
        records = generate_records(model, tok, texts, sampling, mesh=mesh, **options)
        return write_records(reports.progress(records, "generate-teacher", "prompt", len(texts)),
                             out)
    print(hosts.describe_share(model))
    records = shared_records(model, tok, texts, sampling, mesh=mesh, **options)
    if jax.process_index() == 0:
        return write_records(records, out)
    for _ in records:  # the other processes take part in every round
        pass
    return 0


def shared_records(model: LLaDAModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                   sampling: Sampling = Sampling(), *, batch_size: int = 8,
                   **options) -> Iterator[dict]:
    """Several processes: each generates its share of `prompts` (hosts.py); every record, in
    prompt order, on every process (options: generate_batches's)."""
    count, rank = jax.process_count(), jax.process_index()
    token_text = TokenText(tokenizer)
    batches = generate_batches(model, tokenizer, prompts[rank::count], sampling,
                               batch_size=batch_size, numbers=range(rank, len(prompts), count),
                               **options)
    for batch in hosts.own_rounds(batches, len(prompts), batch_size):
        local = [(index, to_record(text, row, tokenizer, token_text)) for index, text, row in batch]
        yield from (record for _, record in sorted(hosts.gather(local), key=lambda x: x[0]))


