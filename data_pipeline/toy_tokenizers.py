"""Small real tokenizers for tests and the demo, trained in a second with the `tokenizers` library.

Two different families, so a teacher and a student really disagree:
- `byte_level_bpe`: GPT-2 / LLaMA-3 style (byte-level alphabet, 'Ġ' = space), like the teacher.
- `sentencepiece_bpe`: LLaMA-2 style ('▁' = space, a dummy prefix space, `<0xNN>` byte fallback
  for characters outside its small alphabet).
Both save a `tokenizer.json` that `tokenizers.Tokenizer.from_file` and transformers'
`PreTrainedTokenizerFast(tokenizer_file=...)` load.

    teacher_dir, student_dir = save_toy_tokenizers(texts, out_dir)
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|eot|>"
SPECIAL_TOKENS = ["<|pad|>", EOS, "<|mask|>"]


def byte_level_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: every byte string is representable, token strings use the 'Ġ' alphabet."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    return tok


def sentencepiece_bpe(texts: Iterable[str], vocab_size: int,
                      alphabet_size: int = 40) -> Tokenizer:
    """'▁'-space BPE with byte fallback: characters outside its alphabet become `<0xNN>`."""
    texts = list(texts)
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    # The alphabet is chosen here (most frequent characters, ties by code point): the trainer's
    # own `limit_alphabet` cut breaks frequency ties in hash order, so the tokenizer (and every
    # dataset built with it) would differ from run to run.
    counts = collections.Counter("".join("▁" + t.replace(" ", "▁") for t in texts))
    alphabet = sorted(counts, key=lambda ch: (-counts[ch], ch))[:alphabet_size]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet),
                                  show_progress=False)
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre
    learner.train_from_iterator(texts, trainer)
    # Retrain-free rebuild: the learnt vocab plus the 256 byte tokens, with byte fallback on.
    vocab = learner.get_vocab(with_added_tokens=True)
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", max(vocab.values()) + 1)
    merges = [tuple(m) for m in _merges(learner)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tok


def _merges(tok: Tokenizer) -> list[list[str]]:
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [m.split(" ") if isinstance(m, str) else m for m in merges]


def save_toy_tokenizers(texts: list[str], out_dir: str, teacher_vocab: int = 400,
                        student_vocab: int = 300) -> tuple[str, str]:
    """Trains both tokenizers on `texts`; returns the teacher and student directories."""
    paths = []
    for name, tok in (("teacher", byte_level_bpe(texts, teacher_vocab)),
                      ("student", sentencepiece_bpe(texts, student_vocab))):
        path = os.path.join(out_dir, name)
        os.makedirs(path, exist_ok=True)
        tok.save(os.path.join(path, "tokenizer.json"))
        paths.append(path)
    return paths[0], paths[1]
