"""The training dataset straight from the teacher, no JSON (`generate-teacher --records DATA_DIR`).

    llada-jax generate-teacher --teacher LLAMA_DIR --prompts p.txt --records DATA_DIR \\
        --student-tokenizer LLADA_TOK --top-k 64 [--max-length 4096]

Each generated row becomes the seed-format record in memory (validate.TeacherRecord: the same
chosen tokens and top-5 the JSON route writes, and the full float32 logits, not rounded to
text) and goes through data_pipeline's own Converter (vocabulary map, character-offset
alignment to the student tokenizer, top-k + exact tail mass over the teacher's full
vocabulary) and dataset writer (preprocess.write_dataset: same TFDS layout, splits, report.json
and skipped.jsonl). So the dataset equals `generate-teacher --full-logits` then `preprocess`
with the same options, up to the JSON route's rounding of logits to 5 decimals.

Multi-host (jax.process_count() > 1): process p generates prompts p, p + P, p + 2P, ... (with
--mesh, all processes decode together, one teacher sharded over the global mesh: hosts.py);
after each round of one batch per process the converted records are gathered (allgather over
JAX's collectives) and process 0 writes them, in prompt order, once. DATA_DIR is read by every
process (shared storage such as GCS on a pod) to decide whether a finished dataset is reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from transformers import PreTrainedTokenizerBase

from data_pipeline import preprocess, records
from data_pipeline.convert import Converter, Options, Result
from data_pipeline.validate import Entry, TeacherRecord
from llada_jax.model.modeling import LLaDAModel
from llada_jax.teacher import generate as gen
from llada_jax.teacher import hosts
from llada_jax.teacher.seed_format import TokenText

SOURCE = "generate-teacher"  # the `file` of each record in the report


def teacher_record(prompt: str, row: gen.Row, tokenizer: PreTrainedTokenizerBase,
                   token_text: TokenText, converter: Converter) -> TeacherRecord:
    """The seed-format record of one generated row, its full logits reduced by the converter."""
    entries = [Entry(chosen_token=token_text(token_id), chosen_id=token_id,
                     top5_tokens=[token_text(int(i)) for i in top_ids],
                     top5_ids=np.asarray(top_ids, np.int64),
                     top5_logits=np.asarray(top_logits, np.float64),
                     full=converter.reduce_full(np.asarray(full, np.float32)))
               for token_id, (top_ids, top_logits, full) in zip(row.ids, row.entries)]
    response = tokenizer.decode(row.ids, skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
    return TeacherRecord(prompt, response, entries)


def write_teacher_dataset(model: LLaDAModel, tokenizer: PreTrainedTokenizerBase,
                          prompts: Sequence[str], out: str, opts: Options,
                          sampling: gen.Sampling = gen.Sampling(), *, batch_size: int = 8,
                          overwrite: bool = False, **options) -> dict | None:
    """Generates for `prompts` (all of them: each process takes its share) and writes the
    dataset under `out`; the report dict on process 0, None on the others. `options`:
    generate_batches's (chat_template, mesh). A finished dataset in `out` is reused only if it
    was made from the same prompts, teacher and decoding settings (`sources`)."""
    converter = preprocess.checked_converter(opts)
    count, rank = jax.process_count(), jax.process_index()
    prompts = list(prompts)
    finished = os.path.isdir(os.path.join(out, records.NAME, records.VERSION)) and not overwrite
    batches = gen.generate_batches(model, tokenizer, prompts[rank::count], sampling,
                                   batch_size=batch_size, full_logits=True,
                                   numbers=range(rank, len(prompts), count), **options)
    token_text = TokenText(tokenizer)

    def results() -> Iterator[Result]:
        for batch in hosts.own_rounds(batches, 0 if finished else len(prompts), batch_size):
            local = [converter.convert_parsed(SOURCE, index, teacher_record(
                         text, row, tokenizer, token_text, converter))
                     for index, text, row in batch]
            yield from sorted(hosts.gather(local), key=lambda r: r.index)

    if rank == 0:
        return preprocess.write_dataset(
                results, out, opts, converter, inputs=[SOURCE], input_bytes=0,
                overwrite=overwrite, sources=sources(model, prompts, sampling, options))
    for _ in results():
        pass
    return None


def sources(model: LLaDAModel, prompts: list[str], sampling: gen.Sampling, options: dict
            ) -> dict:
    """What the generated records depend on besides the converter's options: the prompts (a
    hash), the teacher (its config) and the decoding settings."""
    digest = hashlib.sha256(json.dumps(prompts).encode("utf-8")).hexdigest()
    teacher = hashlib.sha256(json.dumps(model.cfg.to_hf_config(), sort_keys=True).encode()
                             ).hexdigest()[:16]
    return {"generate_teacher": {"prompts": len(prompts), "prompts_sha256": digest,
                                 "teacher_config_sha256": teacher,
                                 "sampling": dataclasses.asdict(sampling),
                                 "chat_template": bool(options.get("chat_template"))}}

