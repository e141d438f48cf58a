"""Between the drafter's vocabulary and the teacher's: what the drafter may propose, how its draft
becomes teacher proposals, and how the teacher-verified text becomes the drafter's context.

Token strings are compared as bytes with `data_pipeline.alignment` (the map `preprocess` uses).
Two strategies when the vocabularies differ:
- `tli` (token-level intersection, Timor et al., ICML 2025): the drafter may propose only
  student tokens whose bytes are also one teacher token; each maps to that teacher id and keeps
  its q (restricted to the intersection, renormalised, scattered into the teacher vocabulary),
  so standard speculative sampling runs unchanged: lossless, sampled or greedy.
- `string`: the draft's text is re-tokenised by the teacher's tokenizer; those teacher tokens
  have no known law and are verified as point masses (greedy: exact match), also lossless.
The teacher's ids are the ground truth: after each block the student context is the student
tokenization of prompt text + the decoded teacher continuation (the same tokenization of prompt
and response as `preprocess`). With identical vocabularies the teacher ids are used directly.
"""

from __future__ import annotations

import numpy as np
from transformers import AutoTokenizer

from data_pipeline import alignment
from llada_jax.speculate.draft import Draft

STRATEGIES = ("tli", "string")


class VocabBridge:
    def __init__(self, student_tokenizer: str, teacher_tokenizer: str, strategy: str, *,
                 student_vocab_size: int, teacher_vocab_size: int, mask_token_id: int):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
        self.strategy = strategy
        self.student = alignment.Vocab.from_tokenizer(alignment.load_tokenizer(student_tokenizer))
        self.teacher = alignment.Vocab.from_tokenizer(alignment.load_tokenizer(teacher_tokenizer))
        self.teacher_hf = AutoTokenizer.from_pretrained(teacher_tokenizer, local_files_only=True)
        self.shared = alignment.same_vocab(self.teacher, self.student)
        self.teacher_vocab_size = teacher_vocab_size
        # student id -> teacher id of the same bytes (the lowest such teacher id), else -1
        self.to_teacher = alignment.student_to_teacher(self.teacher, self.student,
                                                       student_vocab_size, teacher_vocab_size)
        spelled = np.asarray([i < len(self.student) and self.student.id_bytes[i] is not None
                              for i in range(student_vocab_size)])
        self.allowed = (self.to_teacher >= 0) if strategy == "tli" else spelled
        self.allowed[mask_token_id] = False

    def intersection_size(self) -> int:
        return int((self.to_teacher >= 0).sum())

    def stop_ids(self, *teacher_eos: int | list[int] | None) -> set[int]:
        """The tokenizer's EOS and every id given (config / generation_config eos: an id or a
        list of ids, as Llama-3 Instruct's generation_config has)."""
        ids = set()
        for eos in (self.teacher_hf.eos_token_id, *teacher_eos):
            ids.update([] if eos is None else [eos] if isinstance(eos, int) else eos)
        return ids

    def teacher_prompt(self, prompt: str) -> list[int]:
        """What the teacher sees (its tokenizer's own specials, e.g. BOS), as generate-teacher."""
        return self.teacher_hf(prompt)["input_ids"]

    def text(self, teacher_ids: list[int]) -> str:
        raw = b"".join(self.teacher.id_bytes[i] or b"" for i in teacher_ids)
        return raw.decode("utf-8", errors="ignore")  # a character cut by the last token waits

    def student_context(self, prompt: str, prompt_ids: list[int], completion: list[int]) -> list[int]:
        if self.shared:
            return prompt_ids + completion
        ids, _ = self.student.encode(prompt)
        rest = self.student.encode(self.text(completion))[0] if completion else []
        return [*map(int, ids), *map(int, rest)]

    def proposals(self, draft: Draft) -> tuple[list[int], list[np.ndarray | None]]:
        """Teacher ids to verify and the law of each (None: verify as a point mass)."""
        if self.strategy == "string":
            raw = b"".join(self.student.id_bytes[i] or b"" for i in draft.ids)
            ids, _ = self.teacher.encode(raw.decode("utf-8", errors="ignore"))
            ids = [int(i) for i in ids if i < self.teacher_vocab_size]
            return ids, [None] * len(ids)
        ids = [int(self.to_teacher[i]) for i in draft.ids]
        rows = []
        for q, exact in zip(draft.q_rows, draft.exact):
            if not exact:
                rows.append(None)
                continue
            row = np.zeros(self.teacher_vocab_size, np.float64)
            keep = np.flatnonzero(self.allowed)
            row[self.to_teacher[keep]] = q[keep]
            rows.append(row)
        return ids, rows
