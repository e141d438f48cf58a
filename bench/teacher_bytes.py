"""Bytes per teacher token of generate-teacher's two routes on the demo teacher: the JSON dump
(`--full-logits --out`, the seed format preprocess reads) vs the records (`--records`, top-k
with the exact tail, the training dataset itself), both from the same greedy run.

The JSON's size is linear in the teacher vocabulary (one 5-decimal number per id per token), so
its cost at LLaMA-3's V = 128256 is also COMPUTED (not measured): the measured bytes per token
outside `full_logits`, plus 128256 times the measured text bytes per logit (digits, sign and
", " as written for this teacher's logits). The records do not grow with V.

    python bench/teacher_bytes.py [--prompts 64] [--new-tokens 32] [--top-k 32 64]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile

import benchlib

from data_pipeline import records
from llada_jax import cli

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "llada_jax" / "demo_assets"
LLAMA3_VOCAB = 128256


def json_sizes(path: pathlib.Path) -> tuple[int, int, int, int]:
    """(file bytes, teacher tokens, bytes of the full_logits arrays' text, logits written)."""
    tokens = logits_bytes = values = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            for entry in json.loads(line)["logits"]:
                tokens += 1
                logits_bytes += len(json.dumps(entry["full_logits"]))
                values += len(entry["full_logits"])
    return os.path.getsize(path), tokens, logits_bytes, values


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--top-k", type=int, nargs="+", default=[32, 64])
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    print(benchlib.load())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        lines = (ASSETS / "prompts_train.txt").read_text().splitlines()[:args.prompts]
        (tmp / "p.txt").write_text("\n".join(lines) + "\n")
        common = ["generate-teacher", "--teacher", str(ASSETS / "teacher"), "--tokenizer",
                  str(ASSETS / "teacher_tokenizer"), "--prompts", str(tmp / "p.txt"), "--greedy",
                  "--max-new-tokens", str(args.new_tokens), "--batch-size", str(args.batch_size)]
        assert cli.main([*common, "--full-logits", "--out", str(tmp / "t.jsonl")]) == 0
        size, tokens, logits_bytes, values = json_sizes(tmp / "t.jsonl")
        vocab = values // tokens
        per_logit = logits_bytes / values
        rest = (size - logits_bytes) / tokens
        print(f"{len(lines)} prompts, {tokens} teacher tokens (greedy, <= {args.new_tokens} each)")
        print(f"JSON --full-logits (V = {vocab}): {size / tokens:,.0f} bytes per teacher token "
              f"measured ({per_logit:.2f} bytes per logit, {rest:,.0f} outside full_logits)")
        print(f"JSON at V = {LLAMA3_VOCAB} (computed, not measured): "
              f"{rest + LLAMA3_VOCAB * per_logit:,.0f} bytes per teacher token")
        for k in args.top_k:
            out = tmp / f"records_k{k}"
            assert cli.main([*common, "--records", str(out), "--student-tokenizer",
                             str(ASSETS / "student_tokenizer"), "--top-k", str(k)]) == 0
            with open(os.path.join(records.dataset_dir(str(out)), "report.json")) as f:
                report = json.load(f)
            print(f"records top-{k} (format {report['metadata']['options']['record_format']}): "
                  f"{report['bytes_on_disk'] / tokens:,.1f} bytes per teacher token on disk "
                  f"({report['bytes_per_response_token']} per student response token, report)")


if __name__ == "__main__":
    main()
