"""Seed-format teacher records made with real (toy) tokenizers, for the data pipeline tests."""

from __future__ import annotations

import json
import os

import numpy as np
from tokenizers import Tokenizer

from data_pipeline.toy_tokenizers import save_toy_tokenizers

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Snow ☃ falls on the café in Zürich; naïve façades glow.",
    "def add(a, b):\n    return a + b  # tabs\tand  spaces",
    "Speculative decoding drafts tokens that a larger model verifies.",
] * 4


def make_tokenizers(out_dir: str) -> tuple[str, str]:
    """(teacher_dir, student_dir): byte-level BPE teacher, sentencepiece-style student."""
    return save_toy_tokenizers(TEXTS, os.path.join(out_dir, "tok"))


def teacher_record(tok: Tokenizer, prompt: str, response: str, rng: np.random.Generator,
                   full: bool = True) -> dict:
    """The record a teacher with tokenizer `tok` would dump for `response` (random logits)."""
    enc = tok.encode(response, add_special_tokens=False)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    entries = []
    for pos, (tid, token) in enumerate(zip(enc.ids, enc.tokens)):
        logits = rng.normal(0.0, 3.0, vocab).round(4)
        logits[tid] += 8.0
        top = np.argsort(-logits, kind="stable")[:5]
        entry = {"position": pos, "chosen_token": token, "chosen_token_id": tid,
                 "top_5": [{"token": tok.id_to_token(int(i)), "token_id": int(i),
                            "logit": float(logits[i])} for i in top]}
        if full:
            entry["full_logits"] = logits.tolist()
        entries.append(entry)
    return {"prompt": prompt, "response": response, "logits": entries}


def write_json(path: str, records: list, jsonl: bool = False) -> str:
    with open(path, "w", encoding="utf-8") as f:
        if jsonl:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        else:
            json.dump(records, f, ensure_ascii=False)
    return path
