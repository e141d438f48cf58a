"""The drafter's context per row, grown by the new teacher tokens only.

    bridge = EngineBridge.from_vocab_bridge(vocab_bridge)   # or IdBridge(...) for raw ids
    teacher_ids, row = bridge.start(prompt)                 # prompt: text (or ids, IdBridge)
    changed_from = row.extend(new_teacher_ids)              # row.ids: the student context

`row.ids` is the student tokenization of the text so far: with one vocabulary the teacher ids
themselves; with two, the student tokenization of the prompt text followed by that of the
decoded continuation (what `vocab_bridge.VocabBridge.student_context` recomputes from scratch).
Here only a tail is re-encoded: the last few student tokens (back to a word start) are dropped
and the text from their first byte on is encoded again and spliced. `extend` returns the first
index whose id may have changed, so a drafter cache rolls back to it. A different context can
only change what is drafted (acceptance), never what is emitted.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Student tokens dropped before re-encoding the tail: at least this many, back to one that
# starts a word (a space or newline first), at most TAIL_MAX.
TAIL_MIN, TAIL_MAX = 2, 8


@dataclasses.dataclass
class IdRow:
    """Student ids = a table applied to the teacher ids (identity for one vocabulary)."""
    ids: list[int]
    table: np.ndarray | None

    def extend(self, teacher_ids: list[int]) -> int:
        changed = len(self.ids)
        self.ids += teacher_ids if self.table is None else self.table[teacher_ids].tolist()
        return changed


@dataclasses.dataclass
class TextRow:
    """Two vocabularies: the student ids of prompt + continuation text, re-encoded at the tail."""
    vocab: object            # data_pipeline.alignment.Vocab of the student
    teacher_bytes: list      # teacher id -> bytes (None for holes)
    prompt_ids: list[int]
    raw: bytes = b""         # the continuation's bytes (teacher tokens' bytes joined)
    tail_ids: list[int] = dataclasses.field(default_factory=list)
    starts: list[int] = dataclasses.field(default_factory=list)  # byte start in raw per tail id

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.tail_ids

    def extend(self, teacher_ids: list[int]) -> int:
        self.raw += b"".join(self.teacher_bytes[i] or b"" for i in teacher_ids)
        keep = self._keep()
        at = self.starts[keep] if keep < len(self.starts) else 0
        text = self.raw[at:].decode("utf-8", errors="ignore")
        ids, starts = self.vocab.encode(text) if text else (np.zeros(0, np.int32), np.zeros(0))
        if text.encode("utf-8") != self.raw[at:] or (starts < 0).any():
            # Bytes the decode drops (a cut character, invalid UTF-8): offsets would not match
            # the raw bytes, so encode everything as the full recomputation does.
            keep, at = 0, 0
            full = self.raw.decode("utf-8", errors="ignore")
            ids, starts = self.vocab.encode(full) if full else (np.zeros(0, np.int32), np.zeros(0))
            starts = np.full(len(ids), -1) if full.encode("utf-8") != self.raw else starts
        self.tail_ids = self.tail_ids[:keep] + [int(i) for i in ids]
        self.starts = self.starts[:keep] + [int(s) + at if s >= 0 else -1 for s in starts]
        return len(self.prompt_ids) + keep

    def _keep(self) -> int:
        """How many tail ids stay: drop TAIL_MIN..TAIL_MAX back to a word start whose byte
        offset is known and on a character boundary (else re-encode everything)."""
        n = len(self.tail_ids)
        for keep in range(n - TAIL_MIN, max(n - TAIL_MAX, 0) - 1, -1):
            if keep <= 0:
                return 0
            start = self.starts[keep]
            if start < 0 or self.raw[start] & 0xC0 == 0x80:
                continue
            piece = self.vocab.id_bytes[self.tail_ids[keep]] or b""
            if piece[:1] in (b" ", b"\n"):
                return keep
        for keep in range(max(n - TAIL_MIN, 0), 0, -1):  # no word start: any clean boundary
            if self.starts[keep] >= 0 and self.raw[self.starts[keep]] & 0xC0 != 0x80:
                return keep
        return 0


@dataclasses.dataclass
class EngineBridge:
    """What the engine needs from a vocabulary bridge: the device tables and the rows."""
    to_teacher: np.ndarray   # int [V_student]: teacher id of the same bytes, -1 none
    allowed: np.ndarray      # bool [V_student]: what the drafter may propose
    vocab_bridge: object = None

    @classmethod
    def from_vocab_bridge(cls, bridge) -> "EngineBridge":
        return cls(bridge.to_teacher, bridge.allowed, bridge)

    def start(self, prompt: str):
        """(teacher prompt ids, the row's student context)."""
        b = self.vocab_bridge
        teacher_ids = b.teacher_prompt(prompt)
        if b.shared:
            return teacher_ids, IdRow(list(teacher_ids), None)
        return teacher_ids, TextRow(b.student, b.teacher.id_bytes,
                                    [int(i) for i in b.student.encode(prompt)[0]])

    def text(self, teacher_ids: list[int]) -> str:
        return self.vocab_bridge.text(teacher_ids)


@dataclasses.dataclass
class IdBridge:
    """Prompts given as teacher ids; student ids = teacher_to_student[teacher id] (for tests
    and benchmarks without tokenizers, e.g. random models at real vocabulary sizes)."""
    to_teacher: np.ndarray
    allowed: np.ndarray
    teacher_to_student: np.ndarray

    def start(self, prompt: list[int]):
        return list(prompt), IdRow(self.teacher_to_student[list(prompt)].tolist(),
                                   self.teacher_to_student)

    def text(self, teacher_ids: list[int]) -> str:
        return " ".join(map(str, teacher_ids))
