"""Prompts for generate-teacher: read from files, turned into the ids the teacher sees."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator, Sequence

from transformers import PreTrainedTokenizerBase

from llada_jax.errors import GenerateError


def read_prompts(paths: Sequence[str | pathlib.Path]) -> Iterator[str]:
    """Prompts from text files (one per non-blank line), .jsonl or .json (objects with "prompt")."""
    for path in map(pathlib.Path, paths):
        try:
            yield from _read_file(path)
        except UnicodeDecodeError as e:
            raise GenerateError(f"prompts file {path} is not UTF-8 text (byte {e.start}): pass "
                                f"a text, .jsonl or .json file of prompts") from None


def _read_file(path: pathlib.Path) -> Iterator[str]:
    if path.is_dir():
        raise GenerateError(f"prompts file {path} is a folder; pass the prompt files in it")
    if not path.is_file():
        raise GenerateError(f"prompts file {path} does not exist")
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise GenerateError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); a .json prompts "
                                f"file is an array of objects with a \"prompt\"") from None
        items = enumerate(rows if isinstance(rows, list) else [rows], 1)
        yield from (_prompt_field(r, f"{path} element {i}") for i, r in items)
        return
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                yield line.rstrip("\r\n")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise GenerateError(f"{path}:{line_no}: not valid JSON ({e.msg}); each line of "
                                    f"a .jsonl prompts file is one object with a \"prompt\"") from e
            yield _prompt_field(record, f"{path}:{line_no}")


def nonempty(prompts: Sequence[str], paths: Sequence) -> list[str]:
    """The prompts as a list; none at all is an error (a run that writes nothing)."""
    prompts = list(prompts)
    if not prompts:
        raise GenerateError(f"no prompts in {', '.join(map(str, paths))}: the file(s) hold only "
                            f"blank lines")
    return prompts


def _prompt_field(record, where: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise GenerateError(f"{where}: expected an object with a string \"prompt\" field, got "
                            f"{json.dumps(record)[:80]}")
    return record["prompt"]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str,
               chat_template: bool) -> tuple[str, list[int]]:
    """(the record's prompt text, the ids the teacher sees)."""
    if not chat_template:
        return prompt, tokenizer(prompt)["input_ids"]
    if not tokenizer.chat_template:
        raise GenerateError("--chat-template: the teacher tokenizer has no chat_template "
                            "(tokenizer_config.json / chat_template.jinja); drop the flag")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]
