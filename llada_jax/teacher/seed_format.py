"""The seed format (DESIGN.md "Data contract") written by generate-teacher: one record per
prompt, `{prompt, response, logits: [{position, chosen_token, chosen_token_id, top_5,
full_logits}]}`, streamed to a .jsonl or .json file."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable

from transformers import PreTrainedTokenizerBase

from llada_jax.errors import GenerateError

LOGIT_DECIMALS = 5


class TokenText:
    """id -> the tokenizer's decode of that single id, cached."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False,
                                                         clean_up_tokenization_spaces=False)
        return self.cache[token_id]


def _logit(x) -> float:
    return round(float(x), LOGIT_DECIMALS)


def to_record(prompt: str, row, tokenizer: PreTrainedTokenizerBase,
              token_text: TokenText) -> dict:
    entries = []
    for position, (token_id, (top_ids, top_logits, full)) in enumerate(zip(row.ids, row.entries)):
        entry = {"position": position, "chosen_token": token_text(token_id),
                 "chosen_token_id": token_id,
                 "top_5": [{"token": token_text(int(i)), "token_id": int(i), "logit": _logit(v)}
                           for i, v in zip(top_ids, top_logits)]}
        if full is not None:
            entry["full_logits"] = [_logit(v) for v in full]
        entries.append(entry)
    response = tokenizer.decode(row.ids, skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
    return {"prompt": prompt, "response": response, "logits": entries}


def checked_out_path(out_path: str | pathlib.Path, overwrite: bool = True) -> pathlib.Path:
    out_path = pathlib.Path(out_path)
    if out_path.suffix not in (".json", ".jsonl"):
        raise GenerateError(f"--out {out_path}: the name must end in .json or .jsonl")
    if out_path.is_dir():
        raise GenerateError(f"--out {out_path} is a folder; name the output file")
    if out_path.exists() and not overwrite:
        raise GenerateError(f"--out {out_path} already exists; pass --overwrite to replace it, "
                            f"or choose another name")
    return out_path


def write_records(records: Iterable[dict], out_path: str | pathlib.Path) -> int:
    """Streams records to a .jsonl (one per line) or .json (an array) file; returns the count.
    They go to a temporary file next to it, renamed over `out_path` once complete: a killed
    or failed run never leaves a partial file that looks like a finished one."""
    out_path = checked_out_path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out_path.suffix == ".jsonl"
    count = 0
    partial = out_path.with_name(f".{out_path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "w", encoding="utf-8") as f:
            f.write("" if jsonl else "[\n")
            for record in records:
                f.write(("" if jsonl or not count else ",\n") + json.dumps(record)
                        + ("\n" if jsonl else ""))
                count += 1
            f.write("" if jsonl else "\n]\n")
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
    return count
