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
one cached step (teacher/decode.py), compiled once per prompt-length bucket.
Output is streamed (JSONL line by line; a JSON array element by element), so memory stays
bounded by one batch. Several processes (--coordinator-address ..., or a TPU slice): each
generates its share of the prompts, with --mesh one teacher sharded over all of them
(hosts.py), and process 0 writes the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import pathlib
import sys
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llada_jax import reports
from llada_jax import sharding
from llada_jax.checkpoints import PARAMS_DIR, load_params
from llada_jax.errors import GenerateError, UserError
from llada_jax.model import params
from llada_jax.model.modeling import LLaDAModel
from llada_jax.teacher import hosts
from llada_jax.teacher.prompts import nonempty, prompt_ids, read_prompts
from llada_jax.tokenizer_checks import vocab_problem
from llada_jax.teacher.decode import CachedLM

TOP_K = 5
PROMPT_BUCKET = 16        # prompt lengths round up to this: few distinct shapes to compile
LOGIT_DECIMALS = 5


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; otherwise softmax(logits / temperature) cut to the top-p nucleus."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


# ----------------------------------------------------------------------------- decoding

def sample_next(logits_bv: jax.Array, key: jax.Array, temperature: float,
                top_p: float) -> jax.Array:
    """int32 [B]: argmax (temperature 0), else a draw from the tempered top-p nucleus."""
    if temperature == 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    scaled = logits_bv / temperature
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # Keep a token while the mass strictly before it is < top_p (the first one always stays).
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


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
class _Row:
    ids: list[int] = dataclasses.field(default_factory=list)
    entries: list[tuple] = dataclasses.field(default_factory=list)  # (top_ids, top_logits, full)
    done: bool = False


def generate_batch(model: LLaDAModel, ids_per_prompt: list[list[int]], sampling: Sampling,
                   stop_ids: set[int], pad_id: int, vocab_size: int, key: jax.Array,
                   batch_size: int, full_logits: bool,
                   mesh: jax.sharding.Mesh | None = None) -> list[_Row] | None:
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
    rows = [_Row() for _ in ids_per_prompt]
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

class _TokenText:
    """id -> the tokenizer's decode of that single id, cached."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False,
                                                         clean_up_tokenization_spaces=False)
        return self.cache[token_id]


def _logit(x) -> float:
    return round(float(x), LOGIT_DECIMALS)


def to_record(prompt: str, row: _Row, tokenizer: PreTrainedTokenizerBase,
              token_text: _TokenText) -> dict:
    entries = []
    for position, (token_id, (top_ids, top_logits, full)) in enumerate(zip(row.ids, row.entries)):
        entry = {"position": position, "chosen_token": token_text(token_id),
                 "chosen_token_id": token_id,
                 "top_5": [{"token": token_text(int(i)), "token_id": int(i), "logit": _logit(v)}
                           for i, v in zip(top_ids, top_logits)]}
        if full is not None:
            entry["full_logits"] = [_logit(v) for v in full]
        entries.append(entry)
    response = tokenizer.decode(row.ids, skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
    return {"prompt": prompt, "response": response, "logits": entries}


def generate_records(model: LLaDAModel, tokenizer: PreTrainedTokenizerBase, prompts: Iterable[str],
                     sampling: Sampling = Sampling(), **options) -> Iterator[dict]:
    """Seed-format records, one per prompt, in prompt order (options: see generate_rows)."""
    token_text = _TokenText(tokenizer)
    for text, row in generate_rows(model, tokenizer, prompts, sampling, **options):
        yield to_record(text, row, tokenizer, token_text)


def generate_rows(model: LLaDAModel, tokenizer: PreTrainedTokenizerBase, prompts: Iterable[str],
                  sampling: Sampling = Sampling(), **options) -> Iterator[tuple[str, _Row]]:
    """(prompt text, generated row) per prompt, in prompt order (options: generate_batches's)."""
    for batch in generate_batches(model, tokenizer, prompts, sampling, **options):
        yield from batch


def generate_batches(model: LLaDAModel, tokenizer: PreTrainedTokenizerBase, prompts: Iterable[str],
                     sampling: Sampling = Sampling(), *, batch_size: int = 8,
                     full_logits: bool = False, chat_template: bool = False,
                     mesh: jax.sharding.Mesh | None = None,
                     numbers: Iterable[int] | None = None) -> Iterator[list[tuple[str, _Row]]]:
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


def _checked_out_path(out_path: str | pathlib.Path, overwrite: bool = True) -> pathlib.Path:
    out_path = pathlib.Path(out_path)
    if out_path.suffix not in (".json", ".jsonl"):
        raise GenerateError(f"--out {out_path}: the name must end in .json or .jsonl")
    if out_path.is_dir():
        raise GenerateError(f"--out {out_path} is a folder; name the output file")
    if out_path.exists() and not overwrite:
        raise GenerateError(f"--out {out_path} already exists; pass --overwrite to replace it, "
                            f"or choose another name")
    return out_path


def write_records(records: Iterable[dict], out_path: str | pathlib.Path) -> int:
    """Streams records to a .jsonl (one per line) or .json (an array) file; returns the count.
    They go to a temporary file next to it, renamed over `out_path` once complete: a killed
    or failed run never leaves a partial file that looks like a finished one."""
    out_path = _checked_out_path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out_path.suffix == ".jsonl"
    count = 0
    partial = out_path.with_name(f".{out_path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "w", encoding="utf-8") as f:
            f.write("" if jsonl else "[\n")
            for record in records:
                f.write(("" if jsonl or not count else ",\n") + json.dumps(record)
                        + ("\n" if jsonl else ""))
                count += 1
            f.write("" if jsonl else "\n]\n")
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
    return count


def load_teacher(teacher: str | pathlib.Path, tokenizer_dir: str | pathlib.Path | None = None,
                 dtype: str = "float32", mesh: jax.sharding.Mesh | None = None,
                 ) -> tuple[LLaDAModel, PreTrainedTokenizerBase]:
    """The teacher (params and compute in `dtype`, sharded over `mesh`) and its tokenizer.

    `teacher` is a params checkpoint (import-hf / train) or an HF model directory (LLaMA:
    config.json + safetensors, read tensor by tensor as import-hf does); the tokenizer defaults
    to the HF directory's own.
    """
    teacher = pathlib.Path(teacher)
    if not teacher.exists():
        raise GenerateError(f"--teacher {teacher} does not exist; pass a causal params "
                            f"checkpoint (import-hf) or an HF LLaMA directory")
    tokenizer_dir = tokenizer_dir or teacher
    hf_dir = not (teacher / PARAMS_DIR).is_dir() and (teacher / "config.json").is_file()
    if tokenizer_dir == teacher and not hf_dir:
        raise GenerateError(f"--tokenizer is needed: {teacher} is a params checkpoint, which "
                            f"holds no tokenizer")
    try:
        if hf_dir:
            _, model = params.load_hf(teacher, mesh=mesh, dtype=dtype, compute_dtype=dtype)
        else:
            _, model = load_params(teacher, mesh=mesh, dtype=dtype, compute_dtype=dtype)
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
    _checked_out_path(out, overwrite)
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
    token_text = _TokenText(tokenizer)
    batches = generate_batches(model, tokenizer, prompts[rank::count], sampling,
                               batch_size=batch_size, numbers=range(rank, len(prompts), count),
                               **options)
    for batch in hosts.own_rounds(batches, len(prompts), batch_size):
        local = [(index, to_record(text, row, tokenizer, token_text)) for index, text, row in batch]
        yield from (record for _, record in sorted(hosts.gather(local), key=lambda x: x[0]))


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True,
                        help="causal params checkpoint, or an HF LLaMA dir (config.json + safetensors)")
    parser.add_argument("--tokenizer", default=None,
                        help="teacher tokenizer directory (HF; default: the --teacher HF dir)")
    parser.add_argument("--dtype", choices=sorted(params.DTYPES), default="float32",
                        help="params and compute dtype (bfloat16 for a large teacher)")
    parser.add_argument("--mesh", default=None,
                        help="device mesh, e.g. tensor=8 (rows over data, heads over tensor)")
    parser.add_argument("--prompts", required=True, nargs="+",
                        help="text (one prompt a line), .jsonl or .json with \"prompt\" fields")
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="output .jsonl or .json (seed format)")
    out.add_argument("--records", metavar="DATA_DIR",
                     help="write the training dataset (as preprocess does) instead of JSON")
    parser.add_argument("--student-tokenizer", help="--records: the student tokenizer (as preprocess)")
    parser.add_argument("--top-k", type=int, default=64, help="--records: teacher log-probs kept")
    parser.add_argument("--record-format", type=int, choices=(1, 2), default=2,
                        help="--records: 2 (default) quantised log-probs, 1 float32 (as preprocess)")
    parser.add_argument("--max-length", type=int, default=4096,
                        help="--records: max student tokens per example")
    parser.add_argument("--validation-fraction", type=float, default=0.05)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out file, or rebuild --records DATA_DIR")
    parser.add_argument("--coordinator-address", default=None,
                        help="multi-process runs off TPU: host:port of process 0")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    parser.add_argument("--temperature", type=float, default=0.0, help="> 0: sample")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-logits", action="store_true",
                        help="also write every logit (vocab_size floats per response token)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chat-template", action="store_true",
                        help="wrap each prompt in the tokenizer's chat template as a user turn")


def run(args: argparse.Namespace) -> int:
    problems = []
    if args.greedy and args.temperature > 0:
        problems.append("--greedy and --temperature > 0 contradict each other; pick one")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        problems.append("need --temperature >= 0 and 0 < --top-p <= 1")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        problems.append("need --max-new-tokens >= 1 and --batch-size >= 1")
    if args.records and not args.student_tokenizer:
        problems.append("--records needs --student-tokenizer (the tokenizer the dataset is for)")
    if problems:
        raise GenerateError("; ".join(problems))
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    from llada_jax.train.trainer import maybe_initialize_distributed

    maybe_initialize_distributed(args)  # before the mesh: it spans every process's devices
    mesh = sharding.make_mesh(sharding.parse_mesh_spec(args.mesh)) if args.mesh else None
    if args.records:
        from llada_jax.teacher import to_records  # it builds on this module
        return to_records.run(args, sampling, mesh)
    if jax.process_index() == 0:
        print(f"generate-teacher: loading {args.teacher}, then up to {args.max_new_tokens} "
              f"tokens per prompt -> {args.out}", file=sys.stderr, flush=True)
    count = generate_teacher(args.teacher, args.tokenizer, args.prompts, args.out, sampling,
                             dtype=args.dtype, mesh=mesh, batch_size=args.batch_size,
                             full_logits=args.full_logits, chat_template=args.chat_template,
                             overwrite=args.overwrite)
    if jax.process_index() == 0:
        print(f"generate-teacher: wrote {count} records to {args.out}")
    return 0
