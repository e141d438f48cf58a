"""On-policy training records: decode training prompts with the current drafter and keep, for
each verified block, what the drafter saw and the teacher's distribution at its drafted slots.

A record is one block, laid out as the drafter's input was:
    prompt   = the student context the drafter saw (prompt + verified text so far)
    response = the drafted slots 0..r, then masks up to γ, then the trailing masks
    targets  = at slot j <= r: the teacher's distribution there given context + draft[:j]
               (the verifier's row j), as top-k in student ids + the exact tail
where r is the first rejected slot (r = γ - 1 when the whole block was accepted). The record goes
through preprocess's own Converter (`reduce_full`: vocabulary map, top-k, tail over the teacher's
full vocabulary), dataset writer, metadata and report, so `train` loads it as it loads
`preprocess` output. The unfilled slots and the trailing masks hold the mask token itself, so
they read as masks under any `loss.mask_mode` and carry no target.

Which target is right for a diffusion drafter whose input is prefix + masks. With one denoising
step, slot j's proposal q_j depends on the prefix only; the draft tokens to its left are masks in
its input. Slot j matters only when the verifier reaches it, i.e. when draft[:j] was accepted,
and then the teacher scores it with p(· | prefix, draft[:j]). So the target of slot j is the
teacher's conditional given the drafter's OWN accepted proposals: an on-policy mixture (the
drafter learns E[p(· | prefix, d_<j) | slot j reached]), unlike offline records, whose slots
are conditioned on the teacher's own text. Slots past the first rejection are never reached in
this block: their rows are conditioned on a token the teacher refused, so they are not kept.
Replay (Draft-OPD): the verified prefix plus the teacher's correction is drafted again and
scored — the next block of the same decode — so the positions past a rejection get their targets
there, conditioned on the corrected prefix; its record has that prefix as context. Decoding is
lossless, so the contexts themselves follow the teacher's law (sampled) or its greedy text.

The collector interface (`blocks(prompts, seed)` -> BlockScore per verified block) is what the
record writer needs; `HostLoopCollector` runs speculate/loop.py's host loop, and a compiled engine
can replace it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence

import numpy as np

from data_pipeline import preprocess
from data_pipeline.convert import Converter, Options, Result
from data_pipeline.validate import TeacherRecord
from llada_jax.errors import SpeculateError
from llada_jax.speculate import loop as sp

SOURCE = "speculate"  # the `file` of each record in the report


class HostLoopCollector:
    """Blocks from `speculate_prompt` (one prompt at a time, on the host), each prompt with its
    own generator: np.random.default_rng([*seed, prompt index])."""

    def __init__(self, session: sp.Session, decoding: sp.Decoding):
        if session.bridge.strategy != "tli" and not session.bridge.shared:
            raise SpeculateError("on-policy records need --strategy tli (or one shared vocabulary):"
                                 " the string strategy re-tokenises drafts, so drafted slots and "
                                 "teacher positions do not correspond")
        self.session, self.decoding = session, decoding

    def blocks(self, prompts: Sequence[str], seed: Sequence[int]
               ) -> Iterator[tuple[int, sp.BlockScore]]:
        s = self.session
        for index, prompt in enumerate(prompts):
            found: list[sp.BlockScore] = []
            sp.speculate_prompt(prompt, s.drafter, s.verifier, s.bridge, self.decoding,
                                s.stop_ids, np.random.default_rng([*seed, index]), found.append)
            yield from ((index, block) for block in found if block.teacher_draft)

    @property
    def layout(self) -> tuple[int, int, int]:
        """(γ, trailing masks, mask token id) of the drafter's input."""
        d = self.session.drafter
        return d.gamma, d.trailing, d.cfg.mask_token_id


def block_result(block: sp.BlockScore, prompt: str, index: int, converter: Converter,
                 layout: tuple[int, int, int], text) -> Result:
    """One block -> the converted record (see the module docstring); `text(teacher ids)` spells
    teacher ids (names the example)."""
    gamma, trailing, mask_id = layout
    kept = min(block.accepted + 1, len(block.teacher_draft))
    unfilled = gamma + trailing - kept
    per_position = [converter.reduce_full(block.logits[j]) for j in range(kept)] + [None] * unfilled
    response_ids = np.asarray(block.student_draft[:kept] + [mask_id] * unfilled, np.int32)
    rec = TeacherRecord(prompt, text(block.teacher_context + block.teacher_draft[:kept]),
                        [None] * kept)
    return converter.convert_ids(SOURCE, index, rec, np.asarray(block.student_context, np.int32),
                                 response_ids, per_position)


def collector_options(session: sp.Session, student_tokenizer: str, teacher_tokenizer: str,
                      top_k: int, max_length: int, record_format: int = 2) -> Options:
    """The Options the records are converted with (all train: the prompts are training ones)."""
    return Options(student_tokenizer, teacher_tokenizer, max_length, top_k,
                   session.verifier.vocab_size, validation_fraction=0.0,
                   record_format=record_format)


def write_records(collector: HostLoopCollector, prompts: Sequence[str], out: str,
                  opts: Options, seed: Sequence[int] = (0,), overwrite: bool = False) -> dict:
    """Collects on `prompts` and writes the dataset under `out` (preprocess.write_dataset: the
    TFDS layout, report.json, skipped.jsonl); returns the report."""
    converter = preprocess.checked_converter(opts)
    layout, text = collector.layout, collector.session.bridge.text

    def results() -> Iterator[Result]:
        for record, (index, block) in enumerate(collector.blocks(prompts, seed)):
            yield block_result(block, prompts[index], record, converter, layout, text)

    return preprocess.write_dataset(results, out, opts, converter, inputs=[SOURCE],
                                    input_bytes=0, overwrite=overwrite)


def write_records_atomically(collector: HostLoopCollector, prompts: Sequence[str], out: str,
                             opts: Options, seed: Sequence[int] = (0,)) -> dict:
    """write_records into `out`.partial, renamed to `out` once complete: `out` exists only
    whole. A `.partial` left by a killed run is removed and redone."""
    partial = out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    report = write_records(collector, prompts, partial, opts, seed)
    os.rename(partial, out)
    return report
