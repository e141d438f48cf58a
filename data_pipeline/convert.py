"""One teacher record -> one stored example (or a skip reason). Runs in the worker processes.

Vocabulary modes (decided once per run, reported as `alignment_mode`):
- "identity": the teacher tokenizer is given and has the student's vocabulary, so the teacher's
  own tokens are the student's response tokens and every position keeps its target;
- "mapped": a different teacher tokenizer is given; teacher ids map to student ids by token bytes;
- "assumed_identity": no teacher tokenizer. Each record is checked against the student
  vocabulary: if every (id, token string) pair it carries matches the student's, it is treated
  as identity; otherwise top-5 candidates are mapped by their token strings, and a record with
  full_logits is skipped (`full_logits_need_teacher_tokenizer`): its ids cannot be mapped safely.

The teacher tokens (`chosen_token` / `chosen_token_id`) must spell the response exactly; that
gives their byte offsets. A student position gets a target only where both tokenizations start a
token at the same byte offset of the response (alignment.align_positions).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from data_pipeline import alignment, placeholders, targets
from data_pipeline.reader import RawRecord
from data_pipeline.validate import Entry, SkipRecord, TeacherRecord, parse_record

NO_TOKENIZER_SCHEMES = ("plain", "byte_level", "sentencepiece")
_NO_SPANS = np.zeros((0, 3), np.int64)


@dataclasses.dataclass(frozen=True)
class Options:
    student_tokenizer: str
    teacher_tokenizer: str | None
    max_length: int
    top_k: int
    teacher_vocab_size: int | None = None
    overlength: str = "skip"  # or "truncate"
    validation_fraction: float = 0.05
    placeholders: tuple[tuple[str, str], ...] | None = None  # placeholders.load_map(MAP)
    record_format: int = 2  # records.FORMATS


@dataclasses.dataclass
class Result:
    """What a worker sends back: an example with its split, or a skip reason."""
    file: str
    index: int
    example: dict[str, np.ndarray] | None = None
    split: str | None = None
    reason: str | None = None
    detail: str | None = None
    stats: dict[str, float] = dataclasses.field(default_factory=dict)


class Converter:
    def __init__(self, opts: Options):
        self.opts = opts
        self.student = _vocab(opts.student_tokenizer)
        self.teacher = _vocab(opts.teacher_tokenizer) if opts.teacher_tokenizer else None
        # Bounds for teacher ids, and the length full_logits must have.
        self.id_bound = opts.teacher_vocab_size or (len(self.teacher) if self.teacher else None)
        self.full_length = self.id_bound or len(self.student)
        if self.teacher is None:
            self.mode, self.id_map = "assumed_identity", None
        elif alignment.same_vocab(self.teacher, self.student):
            self.mode, self.id_map = "identity", None
        else:
            self.mode = "mapped"
            self.id_map = _fit(alignment.vocab_map(self.teacher, self.student), self.id_bound)
        self.mapped_ids = None if self.id_map is None else np.flatnonzero(self.id_map >= 0)
        self.rewriter = placeholders.Rewriter(opts.placeholders, {
            t.content for t in self.student.tokenizer.get_added_tokens_decoder().values()
        }) if opts.placeholders else None
        self.length_hint = (
            "(the teacher vocabulary; pass --teacher-vocab-size if it is padded)" if self.id_bound
            else "(the student vocabulary: without --teacher-tokenizer the tokenizers are assumed "
                 "identical; pass --teacher-tokenizer, or --teacher-vocab-size if it is padded)")

    def __getstate__(self) -> dict:
        """What a worker process receives: all but the teacher's Tokenizer, which conversion
        never calls (its vocabulary bytes and id map travel)."""
        state = dict(self.__dict__)
        if self.teacher is not None:
            state["teacher"] = dataclasses.replace(self.teacher, tokenizer=None)
        return state

    def vocab_matched_pct(self) -> float | None:
        """% of teacher vocabulary ids with a student token of the same bytes (None: unknown)."""
        if self.mode == "mapped":
            return 100.0 * float((self.id_map[:len(self.teacher)] >= 0).mean())
        return 100.0 if self.mode == "identity" else None

    def convert(self, raw: RawRecord) -> Result:
        try:
            if raw.error:
                raise SkipRecord(raw.reason, raw.error)
            return self._convert(raw)
        except SkipRecord as skip:
            return Result(raw.file, raw.index, reason=skip.reason, detail=skip.detail)

    def reduce_full(self, logits: np.ndarray) -> targets.Target:
        """One entry's full teacher logits -> its stored target (top-k + tail, student ids)."""
        return targets.from_full_logits(logits, self.id_map, len(self.student), self.opts.top_k,
                                        self.mapped_ids)

    def convert_parsed(self, file: str, index: int, rec: TeacherRecord) -> Result:
        """A record already in memory (generate-teacher --records): convert() after parsing;
        each Entry.full is reduce_full(its logits) or None."""
        try:
            return self._convert_record(file, index, rec)
        except SkipRecord as skip:
            return Result(file, index, reason=skip.reason, detail=skip.detail)

    def convert_ids(self, file: str, index: int, rec: TeacherRecord, prompt_ids: np.ndarray,
                    response_ids: np.ndarray, per_position: list) -> Result:
        """A record whose student tokens are known already (speculate's on-policy records: the
        drafter's own context and draft); per_position[j]: reduce_full's target of response
        position j, or None. `rec` (its text) names the example and picks its split."""
        try:
            return self._example(file, index, rec, prompt_ids, response_ids, per_position)
        except SkipRecord as skip:
            return Result(file, index, reason=skip.reason, detail=skip.detail)

    def _convert(self, raw: RawRecord) -> Result:
        rec = parse_record(raw.text, self.reduce_full, self.id_bound, self.full_length,
                           self.length_hint, start=raw.start, arrays=raw.arrays)
        return self._convert_record(raw.file, raw.index, rec)

    def _convert_record(self, file: str, index: int, rec: TeacherRecord) -> Result:
        written = rec.response.encode("utf-8")
        response, spans = self._rewrite(written)
        pieces, scheme = self._teacher_pieces(rec, (response, written))
        # --placeholders: the teacher's tokens spell the rewritten text or the text as written
        # (it saw the markers); see placeholders.py.
        saw_markers = len(spans) and not _spells(pieces, response, scheme)
        teacher_starts = (placeholders.Rewriter.move_starts(_spell(pieces, written, scheme), spans)
                          if saw_markers else _spell(pieces, response, scheme))
        identity = self._is_identity(rec, pieces, scheme)
        prompt, prompt_spans = self._rewrite(rec.prompt.encode("utf-8"))
        prompt_ids, _ = self.student.encode(prompt.decode("utf-8"))
        if identity and not saw_markers:
            response_ids = np.asarray([e.chosen_id for e in rec.entries], np.int32)
            teacher_of = np.arange(len(rec.entries))
        else:
            response_ids, student_starts = self.student.encode(response.decode("utf-8"))
            teacher_of = alignment.align_positions(teacher_starts, student_starts)
        top5_ids = [self._top5_student_ids(e, scheme, identity) for e in rec.entries]
        per_position = [self._target(rec.entries[i], top5_ids[i]) if i >= 0 else None
                        for i in teacher_of]
        result = self._example(file, index, rec, prompt_ids, response_ids, per_position)
        result.stats["top5_candidates"] = sum(len(ids) for ids in top5_ids)
        result.stats["top5_mapped"] = sum(int((ids >= 0).sum()) for ids in top5_ids)
        result.stats["with_markers"] = int(bool(len(spans) or len(prompt_spans)))
        return result

    def _rewrite(self, text: bytes) -> tuple[bytes, np.ndarray]:
        return self.rewriter.rewrite(text) if self.rewriter else (text, _NO_SPANS)

    def _teacher_pieces(self, rec: TeacherRecord, responses: tuple[bytes, ...]
                        ) -> tuple[list[bytes], str]:
        """The bytes of each teacher token, and the token-string scheme of this record (the
        first whose tokens spell one of `responses`: rewritten, as written)."""
        if self.teacher is not None:
            pieces = []
            ids = self.teacher.id_bytes
            for i, e in enumerate(rec.entries):
                piece = ids[e.chosen_id] if e.chosen_id < len(ids) else None  # padded vocabulary
                if piece is None or piece not in _spellings(e.chosen_token, self.teacher.scheme):
                    raise SkipRecord("chosen_token_mismatch",
                                     f"logits[{i}]: chosen_token {e.chosen_token!r} is not token "
                                     f"{e.chosen_id} of the teacher tokenizer")
                pieces.append(piece)
            return pieces, self.teacher.scheme
        best = None
        for scheme in NO_TOKENIZER_SCHEMES:
            pieces = [alignment.token_bytes(e.chosen_token, scheme) for e in rec.entries]
            if None in pieces:
                continue
            if any(_spells(pieces, r, scheme) for r in responses):
                _check_consistent_ids(rec, scheme)
                return pieces, scheme
            best = best or (pieces, scheme)
        return best or ([e.chosen_token.encode() for e in rec.entries], "plain")

    def _is_identity(self, rec: TeacherRecord, pieces: list[bytes], scheme: str) -> bool:
        if self.mode != "assumed_identity":
            return self.mode == "identity"
        ids = self.student.id_bytes
        agree = all(e.chosen_id < len(ids) and ids[e.chosen_id] == p
                    for e, p in zip(rec.entries, pieces))
        agree = agree and all(
            i < len(ids) and ids[i] == alignment.token_bytes(t, scheme)
            for e in rec.entries for t, i in zip(e.top5_tokens, e.top5_ids))
        if not agree and any(e.full is not None for e in rec.entries):
            raise SkipRecord("full_logits_need_teacher_tokenizer",
                             "its token ids do not match the student vocabulary, so full_logits "
                             "cannot be mapped; pass --teacher-tokenizer")
        return agree

    def _top5_student_ids(self, entry: Entry, scheme: str, identity: bool) -> np.ndarray:
        """int64 [n]: student id of each top-5 candidate, -1 where its token has none."""
        if identity:  # ids of a padded teacher vocabulary have no student token
            return np.where(entry.top5_ids < len(self.student), entry.top5_ids, -1)
        if self.id_map is not None:
            return self.id_map[entry.top5_ids].astype(np.int64)
        get = self.student.byte_to_id.get
        return np.asarray([get(alignment.token_bytes(t, scheme), -1) for t in entry.top5_tokens],
                          np.int64)

    def _target(self, entry: Entry, student_ids: np.ndarray) -> targets.Target | None:
        if entry.full is not None:
            return entry.full
        return targets.from_top5(student_ids, entry.top5_logits, self.opts.top_k)

    def _example(self, file: str, index: int, rec: TeacherRecord, prompt_ids: np.ndarray,
                 response_ids: np.ndarray, per_position: list) -> Result:
        tokens = np.concatenate([prompt_ids, response_ids]).astype(np.int32)
        plen = len(prompt_ids)
        truncated = len(tokens) > self.opts.max_length
        if truncated and (self.opts.overlength == "skip" or plen >= self.opts.max_length):
            raise SkipRecord("over_length", f"{len(tokens)} student tokens (prompt {plen}) > "
                                            f"--max-length {self.opts.max_length}")
        tokens = tokens[:self.opts.max_length]
        per_position = per_position[:len(tokens) - plen]
        kept = [(j, t) for j, t in enumerate(per_position) if t is not None]
        if not kept:
            raise SkipRecord("no_teacher_targets",
                             "no student position starts where a teacher token starts")
        k = max(len(t.ids) for _, t in kept)
        ids = np.zeros((len(kept), k), np.int32)
        logprobs = np.full((len(kept), k), -np.inf, np.float32)
        for row, (_, t) in enumerate(kept):
            ids[row, :len(t.ids)] = t.ids
            logprobs[row, :len(t.ids)] = t.logprobs
        mask = np.zeros(len(tokens), bool)
        mask[[plen + j for j, _ in kept]] = True
        digest = hashlib.sha256(rec.prompt.encode() + b"\0" + rec.response.encode()).digest()
        example = {
            "tokens": tokens,
            "prompt_length": np.int32(plen),
            "target_mask_bits": np.packbits(mask),
            "teacher_ids": ids,
            "teacher_logprobs": logprobs,
            "tail_known": np.bool_(all(t.tail_known for _, t in kept)),
            "example_id": digest[:8].hex(),
        }
        fraction = int.from_bytes(digest[8:16], "big") / 2.0 ** 64
        stats = {"response_tokens": len(tokens) - plen, "target_positions": len(kept),
                 "teacher_positions": len(rec.entries),
                 "mass_kept": sum(t.mass_kept for _, t in kept), "truncated": int(truncated)}
        split = "validation" if fraction < self.opts.validation_fraction else "train"
        return Result(file, index, example, split, stats=stats)


def _fit(id_map: np.ndarray, size: int) -> np.ndarray:
    """id_map cut, or padded with -1 (unmapped), to `size` teacher ids: --teacher-vocab-size may
    exceed the teacher tokenizer's vocabulary (a padded embedding)."""
    return np.concatenate([id_map[:size], np.full(max(size - len(id_map), 0), -1, id_map.dtype)])


def _vocab(path: str) -> alignment.Vocab:
    return alignment.Vocab.from_tokenizer(alignment.load_tokenizer(path))


def _spellings(token: str, scheme: str) -> set[bytes]:
    """Byte strings a JSON token string may stand for: vocabulary form or decoded text."""
    return {b for b in (alignment.token_bytes(token, scheme), token.encode()) if b is not None}


def _spells(pieces: list[bytes], response: bytes, scheme: str) -> bool:
    joined = b"".join(pieces)
    return joined == response or (scheme == "sentencepiece" and joined == b" " + response)


def _spell(pieces: list[bytes], response: bytes, scheme: str) -> np.ndarray:
    """Byte start of each teacher token in the response; SkipRecord if they do not spell it."""
    joined = b"".join(pieces)
    shift = 1 if scheme == "sentencepiece" and joined == b" " + response else 0
    spelled = joined[shift:]
    if spelled != response:
        n = (f"{len(pieces)} teacher tokens spell {len(spelled)} bytes, the response has "
             f"{len(response)}")
        if response.startswith(spelled):
            raise SkipRecord("logits_shorter_than_response", n + " (they spell a prefix)")
        if spelled.startswith(response):
            raise SkipRecord("logits_longer_than_response", n + " (the response is a prefix)")
        at = next(i for i, (a, b) in enumerate(zip(spelled, response)) if a != b)
        raise SkipRecord("teacher_tokens_mismatch_response",
                         f"{n}; they differ from byte {at}: {spelled[at:at + 20]!r} vs "
                         f"{response[at:at + 20]!r}")
    return _starts(pieces, shift)


def _starts(pieces: list[bytes], shift: int) -> np.ndarray:
    """Byte offset of each piece; with a dummy prefix space (shift 1) a piece that is only that
    space starts nothing (-1)."""
    starts = np.cumsum([0] + [len(p) for p in pieces[:-1]], dtype=np.int64) - shift
    if shift and len(starts):
        starts[0] = 0 if len(pieces[0]) > 1 else -1
    return starts


def _check_consistent_ids(rec: TeacherRecord, scheme: str) -> None:
    """Without a teacher tokenizer: one id must always carry the same token string."""
    seen: dict[int, bytes] = {}
    for i, e in enumerate(rec.entries):
        pairs = [(e.chosen_id, e.chosen_token)] + list(zip(e.top5_ids.tolist(), e.top5_tokens))
        for token_id, token in pairs:
            b = alignment.token_bytes(token, scheme)
            if seen.setdefault(token_id, b) != b:
                raise SkipRecord("chosen_token_mismatch",
                                 f"logits[{i}]: token id {token_id} is {token!r} here but "
                                 f"{seen[token_id]!r} elsewhere in the record")
