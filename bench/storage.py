"""Storage: bytes per response token of our records vs the original's preprocessed layout, and
record format 2 (quantised, codec.py) against format 1 (float32) on the same data.

Generates a seed-format file with full logits (bench/seed_data.py), runs the real
`llada-jax preprocess` on it (top-k 64, cross-tokenizer alignment) and the original's
preprocessing (json.load + float32 [L, V] per example, prompt rows included, torch.save) on the
same file. The original's cost at the real LLaDA vocabulary is 4 * V * L bytes per example
(V = 126464); its file at the generated teacher vocabulary is measured to check that formula.
Format 2 vs 1: per target position, the sparse KL (top-k + tail bucket) and the acceptance
alpha (lower bound over the top-k, upper bound with the tail) against a student distribution
(random logits over the student vocabulary, pulled towards the teacher's top-k), |difference|
mean and max. The toy student vocabulary is small, so format 2's bytes are also given with the
same log-probs at ids drawn at random from V = 126464 (LLaDA's size: larger id gaps).

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
import numpy as np
import seed_data

from data_pipeline import codec, records

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
        per_token = {}
        for fmt in (1, 2):
            out = os.path.join(work, f"ours_v{fmt}")
            subprocess.run([sys.executable, "-m", "llada_jax", "preprocess", "--input", src,
                            "--out", out, "--student-tokenizer", student_dir,
                            "--teacher-tokenizer", teacher_dir, "--max-length",
                            str(args.max_length), "--top-k", str(args.top_k), "--overwrite",
                            "--record-format", str(fmt)], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            with open(os.path.join(out, "teacher_targets", "1.0.0", "report.json")) as f:
                report = json.load(f)
            per_token[fmt] = report["bytes_on_disk"] / report["response_tokens"]
            print(f"[ours, record format {fmt}] {report['written']} examples, "
                  f"{report['response_tokens']} response tokens ({report['target_positions']} "
                  f"with a target), ArrayRecord shards {report['bytes_on_disk']} bytes -> "
                  f"{per_token[fmt]:.1f} bytes per response token")
        ours = per_token[2]
        compare_formats(os.path.join(work, "ours_v1"), os.path.join(work, "ours_v2"),
                        report["response_tokens"], work)

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


def _kl_alpha(ids: np.ndarray, lp: np.ndarray, q_logits: np.ndarray) -> tuple:
    """Per position: sparse KL(p || q) over the top-k + tail bucket, alpha lower / upper bound."""
    p = np.exp(lp.astype(np.float64))
    q = np.exp(q_logits - q_logits.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    q_s = np.where(p > 0, np.take_along_axis(q, ids, 1), 0.0)
    p_t = np.clip(1 - p.sum(1), 0, 1)
    q_t = np.clip(1 - q_s.sum(1), 1e-300, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(p > 0, p * (np.log(p) - np.log(np.where(p > 0, q_s, 1))), 0).sum(1)
        kl += np.where(p_t > 0, p_t * (np.log(p_t) - np.log(q_t)), 0)
    low = np.minimum(p, q_s).sum(1)
    return kl, low, low + np.minimum(p_t, q_t)


def compare_formats(dir1: str, dir2: str, response_tokens: int, work: str) -> None:
    rng = np.random.default_rng(0)
    vocab = records.read_info(dir1).metadata["student_vocab_size"]
    deltas = {"KL": [], "alpha_low": [], "alpha_up": []}
    random_ids_bytes = 0
    writer_path = os.path.join(work, "v2_random_ids.array_record")
    from tensorflow_datasets.core import example_serializer
    from tensorflow_datasets.core.utils.lazy_imports_utils import array_record_module
    features = records.FEATURES[2]
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    writer = array_record_module.ArrayRecordWriter(writer_path, "group_size:1")
    for split in records.SPLITS:
        a, b = records.open_split(dir1, split), records.open_split(dir2, split)
        for i in range(len(a)):
            e1, e2 = a[i], b[i]
            assert e1["example_id"] == e2["example_id"]
            z = rng.normal(0, 2, (len(e1["teacher_ids"]), vocab))
            np.put_along_axis(z, e1["teacher_ids"], np.take_along_axis(z, e1["teacher_ids"], 1)
                              + np.where(np.isfinite(e1["teacher_logprobs"]),
                                         e1["teacher_logprobs"] + 6, 0), 1)
            for name, x, y in zip(deltas, _kl_alpha(e1["teacher_ids"], e1["teacher_logprobs"], z),
                                  _kl_alpha(e2["teacher_ids"], e2["teacher_logprobs"], z)):
                deltas[name].append(np.abs(x - y))
            wide = np.stack([rng.choice(126464, e1["teacher_ids"].shape[1], replace=False)
                             for _ in e1["teacher_ids"]]).astype(np.int32)
            ex = {k: v for k, v in e1.items() if k not in ("teacher_ids", "teacher_logprobs")}
            ex.update(codec.encode(wide, e1["teacher_logprobs"]))
            writer.write(serializer.serialize_example(features.encode_example(ex)))
    writer.close()
    random_ids_bytes = os.path.getsize(writer_path)
    for name, d in deltas.items():
        d = np.concatenate(d)
        print(f"[format 2 vs 1] |delta {name}| per position: mean {d.mean():.2e}, max "
              f"{d.max():.2e} over {d.size} positions (goal <= 1e-3)")
    print(f"[format 2] same log-probs, ids at random in V=126464: "
          f"{random_ids_bytes / response_tokens:.1f} bytes per response token (goal <= 200)")


if __name__ == "__main__":
    main()
