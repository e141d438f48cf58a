"""A small real dataset (seed-format teacher records -> `preprocess`) for training tests."""

from __future__ import annotations

import os

import numpy as np
from tokenizers import Tokenizer

from data_pipeline.convert import Options
from data_pipeline.preprocess import preprocess
from tests.data_helpers import TEXTS, make_tokenizers, teacher_record, write_json

WORDS = sorted({w for t in TEXTS for w in t.replace("\n", " ").split()})


def random_examples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS, rng.integers(3, 8))) + f" #{i}:"
        response = " " + " ".join(rng.choice(WORDS, rng.integers(4, 14)))
        out.append((prompt, response))
    return out


def make_dataset(root: str, n: int = 96, *, seed: int = 0, top_k: int = 8,
                 max_length: int = 64) -> str:
    """Builds tokenizers, a teacher dump with full logits and the dataset; returns DATA_DIR."""
    teacher_dir, student_dir = make_tokenizers(root)
    teacher = Tokenizer.from_file(os.path.join(teacher_dir, "tokenizer.json"))
    rng = np.random.default_rng(seed)
    dump = write_json(os.path.join(root, "teacher.jsonl"),
                      [teacher_record(teacher, p, r, rng) for p, r in random_examples(n, seed)],
                      jsonl=True)
    data_dir = os.path.join(root, "data")
    preprocess([dump], data_dir, Options(student_dir, teacher_dir, max_length, top_k,
                                         validation_fraction=0.2), workers=1)
    return data_dir
