"""Teacher -> student alignment: vocabularies by normalised exact token string, positions by offset.

Token strings are normalised to the bytes they stand for, by tokenizer family:
- "byte_level" (GPT-2, LLaMA-3): each char is one byte through GPT-2's bytes<->unicode table
  ('Ġ' = b' ', 'Ċ' = b'\\n');
- "sentencepiece" (LLaMA-2): '▁' = b' ', `<0xNN>` = the byte 0xNN;
- "plain": the UTF-8 of the string as is.
Added/special tokens are always plain. Alignment works on byte offsets of the response (a token
may hold part of a UTF-8 character), which is the char-offset rule of DESIGN.md made exact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from data_pipeline import fileio
from data_pipeline.errors import DataError

SCHEMES = ("plain", "byte_level", "sentencepiece")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's `bytes_to_unicode`: printable bytes map to themselves, others to 256+."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_UNICODE_TO_BYTE = _gpt2_unicode_to_byte()


def token_bytes(token: str, scheme: str) -> bytes | None:
    """The bytes a vocabulary token string stands for; None if it is not valid in `scheme`."""
    if scheme == "byte_level":
        try:
            return bytes(_UNICODE_TO_BYTE[c] for c in token)
        except KeyError:
            return None
    if scheme == "sentencepiece":
        m = _BYTE_TOKEN.fullmatch(token)
        if m:
            return bytes([int(m.group(1), 16)])
        token = token.replace("▁", " ")
    return token.encode("utf-8", "strict")


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer.json file, or a directory holding one or a HF tokenizer (a bucket path is
    copied to a local temporary directory first: see fileio)."""
    path = fileio.local_copy(path)
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if os.path.isfile(file):
        try:
            return Tokenizer.from_file(file)
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise DataError(f"tokenizer {file!r} is not a tokenizer.json ({e}); pass the "
                            f"tokenizer's directory or its tokenizer.json") from None
    if not os.path.isdir(path):
        raise DataError(f"tokenizer {path!r}: no such file or directory (local paths only)")
    if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        raise DataError(f"tokenizer {path!r}: the folder holds no tokenizer.json nor "
                        f"tokenizer_config.json; pass the tokenizer's directory")
    from transformers import AutoTokenizer
    try:
        hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"tokenizer {path!r} cannot be loaded: {e}") from None
    if not hasattr(hf, "backend_tokenizer"):
        raise DataError(f"tokenizer {path!r}: needs a fast (tokenizer.json) tokenizer")
    return hf.backend_tokenizer


def detect_scheme(tok: Tokenizer) -> str:
    """Which token-string normalisation a tokenizer's vocabulary uses."""
    spec = json.loads(tok.to_str())
    parts = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if "ByteLevel" in parts:
        return "byte_level"
    if "▁" in parts or "Metaspace" in parts or spec["model"].get("byte_fallback"):
        return "sentencepiece"
    return "plain"


@dataclasses.dataclass
class Vocab:
    """A tokenizer's vocabulary as bytes: `id_bytes[i]` (None for holes), and bytes -> id."""
    tokenizer: Tokenizer | None  # None in the teacher vocabulary a worker receives (convert.py)
    scheme: str
    id_bytes: list[bytes | None]
    byte_to_id: dict[bytes, int]
    prefix_space: bool  # sentencepiece dummy prefix: encoding "x" yields the bytes " x"

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer) -> "Vocab":
        scheme = detect_scheme(tok)
        added = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}
        vocab = tok.get_vocab(with_added_tokens=True)
        id_bytes: list[bytes | None] = [None] * (max(vocab.values(), default=-1) + 1)
        for token, i in vocab.items():
            id_bytes[i] = added[i].encode() if i in added else token_bytes(token, scheme)
        byte_to_id: dict[bytes, int] = {}
        for i, b in enumerate(id_bytes):
            if b is not None and b not in byte_to_id:  # first (lowest) id wins on duplicates
                byte_to_id[b] = i
        probe = tok.encode("a", add_special_tokens=False).ids
        prefix_space = b"".join(id_bytes[i] or b"" for i in probe) == b" a"
        return cls(tok, scheme, id_bytes, byte_to_id, prefix_space)

    def __len__(self) -> int:
        return len(self.id_bytes)

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [n], byte start of each token in `text` int64 [n]; -1 = not a token start).

        Starts come from the vocabulary bytes when they spell the text exactly (so tokens holding
        part of a character keep their own start), else from the tokenizer's char offsets.
        """
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        ids = np.asarray(enc.ids, np.int32)
        pieces = [self.id_bytes[i] or b"" for i in enc.ids]
        raw = text.encode("utf-8")
        skip = 1 if self.prefix_space and b"".join(pieces) == b" " + raw else 0
        if skip or b"".join(pieces) == raw:
            starts = np.cumsum([0] + [len(p) for p in pieces[:-1]], dtype=np.int64) - skip
            if skip and len(starts):  # a token that is only the dummy prefix starts nothing
                starts[0] = 0 if len(pieces[0]) > 1 else -1
            return ids, starts
        return ids, _starts_from_char_offsets(text, [o[0] for o in enc.offsets])


def _starts_from_char_offsets(text: str, char_starts: Sequence[int]) -> np.ndarray:
    """Char offsets -> byte offsets; a repeated start (a split character) is not a token start."""
    byte_at = np.cumsum([0] + [len(c.encode("utf-8")) for c in text], dtype=np.int64)
    starts = np.full(len(char_starts), -1, np.int64)
    seen = set()
    for j, c in enumerate(char_starts):
        if c not in seen:
            starts[j] = byte_at[c]
            seen.add(c)
    return starts


def vocab_map(teacher: Vocab, student: Vocab) -> np.ndarray:
    """int32 [V_teacher]: the student id whose bytes equal the teacher token's bytes, else -1."""
    return np.asarray([student.byte_to_id.get(b, -1) if b is not None else -1
                       for b in teacher.id_bytes], np.int32)


def student_to_teacher(teacher: Vocab, student: Vocab, student_vocab_size: int,
                       teacher_vocab_size: int) -> np.ndarray:
    """int64 [student_vocab_size]: the teacher id spelled with the same bytes as each student
    id (the lowest such teacher id), -1 where none is: the token-level intersection (TLI) that
    `speculate --strategy tli` drafts from and `loss.intersection_vocab` trains on."""
    out = np.full(student_vocab_size, -1, np.int64)
    t2s = vocab_map(teacher, student)
    for t in np.flatnonzero(t2s >= 0)[::-1]:
        if t2s[t] < student_vocab_size and t < teacher_vocab_size:
            out[t2s[t]] = t
    return out


def same_vocab(teacher: Vocab, student: Vocab) -> bool:
    return teacher.id_bytes == student.id_bytes


def align_positions(teacher_starts: np.ndarray, student_starts: np.ndarray) -> np.ndarray:
    """int64 [n_student]: for each student token, the teacher token starting at the same byte
    offset of the response, or -1 (no target there)."""
    index = {int(s): i for i, s in enumerate(teacher_starts)}
    return np.asarray([index.get(int(s), -1) if s >= 0 else -1 for s in student_starts], np.int64)
