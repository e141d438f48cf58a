"""`preprocess --placeholders MAP`: the original's literal prompt markers -> student special tokens.

Seed-format dumps written by the original carry markers such as `<BOS>` and `<eot_id>` where
LLaMA-3 / LLaDA have special tokens. MAP is a preset name (`llama3`, below) or a JSON file
`{"<marker>": "<special token>", ...}`; every replacement must be a special (added) token of the
student tokenizer, so that it becomes one token id. Without --placeholders the text is left as
it is (what the original did).

What is rewritten where:
- the prompt and the response text, before the student tokenizes them;
- never the teacher's token strings (`chosen_token`, `top_5[].token`): they are what the teacher
  emitted, and its log-probs are over its own tokens.
Position alignment then uses one of two exact offset systems:
- the teacher tokens spell the REWRITTEN response (the teacher emitted the special tokens, the
  dump wrote markers in the text): their byte offsets are used as they are;
- they spell the response AS WRITTEN (the teacher saw the markers as text): each teacher token
  start is moved by the length changes of the replacements before it (`move_starts`), and a
  teacher token starting at or inside a marker gets no student position: its distribution
  predicts the marker's literal text, not the special token the student holds there.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from data_pipeline.errors import DataError

PRESETS = {
    "llama3": {"<BOS>": "<|begin_of_text|>", "<start_id>": "<|start_header_id|>",
               "<end_id>": "<|end_header_id|>", "<eot_id>": "<|eot_id|>",
               "<EOS>": "<|end_of_text|>"},
}


def load_map(spec: str) -> tuple[tuple[str, str], ...]:
    """A preset name or a JSON map file -> (marker, replacement) pairs; ValueError if malformed."""
    if spec in PRESETS:
        mapping = PRESETS[spec]
    elif os.path.isfile(spec):
        try:
            with open(spec, encoding="utf-8") as f:
                mapping = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"--placeholders {spec}: not a readable JSON file ({e})") from None
    else:
        raise DataError(f"--placeholders {spec!r}: neither a preset ({', '.join(PRESETS)}) nor "
                         "a JSON map file")
    if not (isinstance(mapping, dict) and mapping and all(
            isinstance(k, str) and k and isinstance(v, str) for k, v in mapping.items())):
        raise DataError(f"--placeholders {spec}: expected a JSON object of non-empty marker "
                         "strings to replacement strings")
    return tuple(sorted(mapping.items()))


class Rewriter:
    def __init__(self, pairs: tuple[tuple[str, str], ...], special_tokens: set[str]):
        for marker, token in pairs:
            if token not in special_tokens:
                raise DataError(f"--placeholders: {token!r} (for {marker!r}) is not a special "
                                 f"token of the student tokenizer; map the markers to its special "
                                 f"tokens ({', '.join(sorted(special_tokens))})")
        self._to = {m.encode(): t.encode() for m, t in pairs}
        # Longest marker first, so a marker that contains another one wins.
        self._re = re.compile(b"|".join(re.escape(m) for m in sorted(self._to, key=len,
                                                                        reverse=True)))

    def rewrite(self, text: bytes) -> tuple[bytes, np.ndarray]:
        """(rewritten text, int64 [n, 3] of each replaced marker's start, end, new length)."""
        spans = [(m.start(), m.end(), len(self._to[m.group()]))
                 for m in self._re.finditer(text)]
        return (self._re.sub(lambda m: self._to[m.group()], text),
                np.asarray(spans, np.int64).reshape(-1, 3))

    @staticmethod
    def move_starts(starts: np.ndarray, spans: np.ndarray) -> np.ndarray:
        """Byte starts in the text as written -> in the rewritten text; -1 at or inside a marker
        (and where the start was -1)."""
        if not len(spans):
            return starts
        a, b, new = spans.T
        shift = np.concatenate([[0], np.cumsum(new - (b - a))])
        done = np.searchsorted(b, starts, side="right")  # markers that end at or before s
        inside = (done < len(a)) & (a[np.minimum(done, len(a) - 1)] <= starts)
        return np.where((starts < 0) | inside, -1, starts + shift[done])
