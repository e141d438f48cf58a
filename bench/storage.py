"""Storage: bytes per response token of our records vs the original's preprocessed layout.

Generates a seed-format file with full logits (bench/seed_data.py), runs the real
`llada-jax preprocess` on it (top-k 64, cross-tokenizer alignment) and the original's
preprocessing (json.load + float32 [L, V] per example, prompt rows included, torch.save) on the
same file. The original's cost at the real LLaDA vocabulary is 4 * V * L bytes per example
(V = 126464); its file at the generated teacher vocabulary is measured to check that formula.

    python bench/storage.py [--size-mb 128] [--teacher-vocab 8192] [--top-k 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import benchlib
import seed_data

LLADA_VOCAB = 126464


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=float, default=128, help="size of the generated input")
    p.add_argument("--teacher-vocab", type=int, default=8192,
                   help="full_logits length (our bytes do not depend on it; the original's "
                   "are also given at V=126464)")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--workdir", help="keep the files here (default: a temporary directory)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        os.makedirs(work, exist_ok=True)
        teacher_dir, student_dir = seed_data.make_tokenizers(work, args.teacher_vocab)
        src = os.path.join(work, "seed.json")
        gen = seed_data.write_seed_file(src, teacher_dir, target_bytes=int(args.size_mb * 2**20))
        print(f"setup: {gen['examples']} seed-format examples, {gen['teacher_tokens']} teacher "
              f"tokens with full logits over V_teacher={args.teacher_vocab}, "
              f"{gen['bytes'] / 2**20:.1f} MiB of JSON; toy byte-level BPE teacher vs "
              f"'▁'-BPE student; top-k {args.top_k}; {benchlib.load()}")
        out = os.path.join(work, "ours")
        subprocess.run([sys.executable, "-m", "llada_jax", "preprocess", "--input", src,
                        "--out", out, "--student-tokenizer", student_dir, "--teacher-tokenizer",
                        teacher_dir, "--max-length", str(args.max_length), "--top-k",
                        str(args.top_k), "--overwrite"], check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(out, "teacher_targets", "1.0.0", "report.json")) as f:
            report = json.load(f)
        ours = report["bytes_on_disk"] / report["response_tokens"]
        print(f"[ours] {report['written']} examples, {report['response_tokens']} response "
              f"tokens ({report['target_positions']} with a target), ArrayRecord shards "
              f"{report['bytes_on_disk']} bytes -> {ours:.1f} bytes per response token")

        pt = os.path.join(work, "original.pt")
        orig = seed_data.original_preprocess(src, pt, student_dir, max_length=args.max_length,
                                             vocab=args.teacher_vocab)
        measured = os.path.getsize(pt) / orig["response_tokens"]
        formula = 4 * args.teacher_vocab * orig["rows"] / orig["response_tokens"]
        at_llada = 4 * LLADA_VOCAB * orig["rows"] / orig["response_tokens"]
        print(f"[original] {orig['examples']} examples, {orig['rows']} rows (prompt + response)"
              f", {orig['response_tokens']} response tokens; torch.save file at V="
              f"{args.teacher_vocab}: {measured:.0f} bytes per response token (formula "
              f"4*V*L: {formula:.0f}); at V={LLADA_VOCAB}: {at_llada:.0f} bytes per response "
              "token")
        print(f"ours is {at_llada / ours:.0f}x smaller than the original's layout at "
              f"V={LLADA_VOCAB} (goal >= 900x); {measured / ours:.0f}x at V={args.teacher_vocab}")


if __name__ == "__main__":
    main()
