"""Seed-format teacher dumps with full logits, of a chosen size, for the data benchmarks; and the
original preprocessing (json.load + dense float32 [L, V] tensors + torch.save) for comparison.

The teacher and student are the two toy tokenizer families of data_pipeline.toy_tokenizers
(byte-level BPE vs '▁'-space BPE), trained on `CORPUS`, so the real cross-tokenizer alignment
runs. The teacher's vocabulary is filled up to `teacher_vocab` with reserved special tokens (as
LLaMA-3 has), so `full_logits` is as long as a real teacher's: the learnt tokens get N(0, 3)
logits with the chosen token 8 above the row's maximum, reserved ids get -30, written with 4
decimals (about 8 bytes of JSON per logit). Rows are drawn from a pool of random rows (then the
chosen token is raised), which keeps generation near disk speed.
"""

from __future__ import annotations

import json
import os

import numpy as np
from tokenizers import Tokenizer

from data_pipeline.toy_tokenizers import save_toy_tokenizers

CORPUS = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the barn.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Speculative decoding drafts several tokens that a larger model verifies in one pass.",
    "A masked diffusion model fills in every hidden token of the answer at the same time.",
    "Gradient accumulation trades memory for time by summing several small batches.",
    "def add(a, b):\n    return a + b  # tabs\tand  spaces",
    "Snow falls on the café in Zürich; naïve façades glow under the street lamps.",
    "The teacher's distribution over its vocabulary is stored as the top k log-probabilities.",
    "Rivers carry sediment to the sea, where it settles into wide deltas over centuries.",
    "In 1969 two astronauts walked on the Moon and returned safely to the Earth.",
]
PROMPT = "<|user|>\nExplain, in a few sentences: {}\n<|assistant|>\n"
POOL_ROWS = 64


def make_tokenizers(out_dir: str, teacher_vocab: int) -> tuple[str, str]:
    """(teacher_dir, student_dir) with a tokenizer.json each; the teacher has `teacher_vocab`
    ids, all but the learnt ones `<|reserved_N|>` special tokens."""
    teacher_dir, student_dir = save_toy_tokenizers(CORPUS * 4, os.path.join(out_dir, "tok"),
                                                   teacher_vocab=600, student_vocab=400)
    path = os.path.join(teacher_dir, "tokenizer.json")
    tok = Tokenizer.from_file(path)
    learnt = tok.get_vocab_size(with_added_tokens=True)
    if teacher_vocab < learnt:
        raise ValueError(f"teacher_vocab {teacher_vocab} < the {learnt} learnt teacher tokens")
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(teacher_vocab - learnt)])
    tok.save(path)
    return teacher_dir, student_dir


def _learnt_vocab(tok: Tokenizer) -> int:
    """Ids below this are learnt tokens; the rest are reserved."""
    return min((i for t, i in tok.get_vocab(with_added_tokens=True).items()
                if t.startswith("<|reserved_")), default=tok.get_vocab_size(with_added_tokens=True))


class _RowPool:
    """Pre-formatted logit rows; `row(j, chosen)` raises `chosen` above the row's maximum."""

    def __init__(self, rng: np.random.Generator, real_vocab: int, teacher_vocab: int):
        values = np.full((POOL_ROWS, teacher_vocab), -30.0)
        values[:, :real_vocab] = rng.normal(0.0, 3.0, (POOL_ROWS, real_vocab))
        self.values = values.round(4)
        self.texts = [[f"{x:.4f}" for x in row] for row in self.values]
        self.order = np.argsort(-self.values, axis=1, kind="stable")[:, :6]

    def row(self, j: int, chosen: int) -> tuple[str, list[tuple[int, float]]]:
        """(JSON array text of the logits, top-5 (id, logit) pairs)."""
        top_logit = round(float(self.values[j, self.order[j, 0]]) + 8.0, 4)
        texts = self.texts[j].copy()
        texts[chosen] = f"{top_logit:.4f}"
        rest = [(int(i), float(self.values[j, i])) for i in self.order[j] if i != chosen][:4]
        return "[" + ",".join(texts) + "]", [(chosen, top_logit)] + rest


def _record_text(tok: Tokenizer, pool: _RowPool, rng: np.random.Generator,
                 prompt: str, response: str) -> tuple[str, int]:
    """(the record's JSON text, its teacher token count)."""
    enc = tok.encode(response, add_special_tokens=False)
    entries = []
    for pos, (tid, token) in enumerate(zip(enc.ids, enc.tokens)):
        logits_text, top5 = pool.row(int(rng.integers(POOL_ROWS)), tid)
        top5_json = json.dumps([{"token": tok.id_to_token(i), "token_id": i, "logit": x}
                                for i, x in top5], ensure_ascii=False)
        entries.append(f'{{"position": {pos}, "chosen_token": {json.dumps(token, ensure_ascii=False)}, '
                       f'"chosen_token_id": {tid}, "top_5": {top5_json}, '
                       f'"full_logits": {logits_text}}}')
    head = json.dumps({"prompt": prompt, "response": response}, ensure_ascii=False)[:-1]
    return f'{head}, "logits": [{", ".join(entries)}]}}', len(entries)


def write_seed_file(path: str, teacher_dir: str, *, target_bytes: int, seed: int = 0,
                    sentences: tuple[int, int] = (2, 5)) -> dict:
    """Writes a JSON array of seed-format records until the file reaches `target_bytes`.

    full_logits are as long as the teacher tokenizer's vocabulary (`make_tokenizers`). Each
    response is `sentences` (min, max) sentences of CORPUS. Returns {examples, bytes,
    teacher_tokens}.
    """
    tok = Tokenizer.from_file(os.path.join(teacher_dir, "tokenizer.json"))
    rng = np.random.default_rng(seed)
    pool = _RowPool(rng, _learnt_vocab(tok), tok.get_vocab_size(with_added_tokens=True))
    examples = teacher_tokens = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        while f.tell() < target_bytes:
            picks = rng.choice(len(CORPUS), int(rng.integers(*sentences, endpoint=True)))
            response = " ".join(CORPUS[i] for i in picks)
            prompt = PROMPT.format(CORPUS[int(rng.integers(len(CORPUS)))].split(",")[0])
            text, n = _record_text(tok, pool, rng, prompt, response)
            f.write((",\n" if examples else "") + text)
            examples += 1
            teacher_tokens += n
        f.write("\n]\n")
        size = f.tell()
    return {"examples": examples, "bytes": size, "teacher_tokens": teacher_tokens}


def original_preprocess(input_file: str, output_file: str, student_dir: str, *,
                        max_length: int, vocab: int) -> dict:
    """The original `preprocess_alignment_data.py`, re-implemented: json.load the whole file;
    per example tokenize prompt + response with the student tokenizer, a float32 [L, V] tensor
    with zero prompt rows and response row i = full_logits of teacher entry i (by index, cut to
    V); torch.save of the list. Returns {examples, response_tokens, rows}."""
    import torch

    tok = Tokenizer.from_file(os.path.join(student_dir, "tokenizer.json"))
    with open(input_file, encoding="utf-8") as f:
        data = json.load(f)
    processed, response_tokens, rows = [], 0, 0
    for example in data:
        prompt_ids = tok.encode(example["prompt"], add_special_tokens=False).ids
        response_ids = tok.encode(example["response"], add_special_tokens=False).ids
        input_ids = (prompt_ids + response_ids)[:max_length]
        llama_logits = torch.zeros(len(input_ids), vocab, dtype=torch.float32)
        for i, entry in enumerate(example["logits"]):
            row = len(prompt_ids) + i
            if row < len(input_ids):
                llama_logits[row] = torch.tensor(entry["full_logits"][:vocab])
        processed.append({"input_ids": torch.tensor(input_ids), "prompt_length": len(prompt_ids),
                          "llama_logits": llama_logits})
        response_tokens += len(input_ids) - len(prompt_ids)
        rows += len(input_ids)
    torch.save(processed, output_file)
    return {"examples": len(processed), "response_tokens": response_tokens, "rows": rows}
