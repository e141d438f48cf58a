"""Streaming keeps memory bounded by a record, not by the file: peak RSS of `llada-jax
preprocess` on a ~300 MB dump stays within a small margin of its RSS on a tiny dump."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer

from tests.helpers import make_tokenizers

V = 8192  # padded teacher vocabulary: ~70 KB of JSON per response token


def _write_dump(path, tok, n_records):
    """n_records distinct records (prompt differs) of ~1.3 MB each, streamed to disk: a JSON
    array, or (a .csv path) the original generator's CSV written with the csv module."""
    rng = np.random.default_rng(0)
    enc = tok.encode("Paris is the capital of France and Berlin of Germany.",
                     add_special_tokens=False)
    entries = []
    for pos, (tid, token) in enumerate(zip(enc.ids, enc.tokens)):
        logits = rng.normal(0, 3, V).round(3)
        entries.append({"position": pos, "chosen_token": token, "chosen_token_id": tid,
                        "top_5": [{"token": token, "token_id": tid, "logit": 9.0}],
                        "full_logits": logits.tolist()})
    if path.endswith(".csv"):
        logits_data = json.dumps(entries)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["prompt", "response", "logits_data"])
            for i in range(n_records):
                w.writerow([f"Q{i}: ", tok.decode(enc.ids), logits_data])
        return os.path.getsize(path)
    body = json.dumps({"response": tok.decode(enc.ids), "logits": entries})[1:]
    with open(path, "w") as f:
        f.write("[")
        for i in range(n_records):
            f.write(("," if i else "") + '{"prompt": "Q%d: ",' % i + body)
        f.write("]")
    return os.path.getsize(path)


_RUN = ("import resource, sys; from llada_jax import cli; rc = cli.main(sys.argv[1:]); "
        "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")


def _peak_rss_mb(args):
    """Peak RSS (MB) of one in-process (--workers 1) preprocess run, and its summary."""
    proc = subprocess.run([sys.executable, "-c", _RUN, "preprocess", *args],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out, peak = proc.stdout.rsplit("PEAK_KB", 1)
    return int(peak) / 1024, json.loads(out[out.index("{"):])


@pytest.mark.slow
@pytest.mark.parametrize("ext", ["json", "csv"])
def test_peak_rss_does_not_grow_with_the_file(tmp_path, ext):
    tdir, _ = make_tokenizers(str(tmp_path))
    tok = Tokenizer.from_file(f"{tdir}/tokenizer.json")
    big = _write_dump(str(tmp_path / f"big.{ext}"), tok, 300)
    assert big > 250e6
    common = ["--student-tokenizer", tdir, "--teacher-tokenizer", tdir, "--teacher-vocab-size",
              str(V), "--max-length", "64", "--top-k", "64", "--workers", "1"]
    big_rss, report = _peak_rss_mb(["--input", str(tmp_path / f"big.{ext}"),
                                     "--out", str(tmp_path / "big"), *common])
    assert report["read"] == report["written"] == 300
    small = _write_dump(str(tmp_path / f"small.{ext}"), tok, 2)
    small_rss, _ = _peak_rss_mb(["--input", str(tmp_path / f"small.{ext}"),
                                 "--out", str(tmp_path / "small"), *common])
    print(f"input {big / 1e6:.0f} MB: peak RSS {big_rss:.0f} MB; "
          f"input {small / 1e6:.1f} MB: {small_rss:.0f} MB")
    assert big_rss - small_rss < 100, (big_rss, small_rss)  # the file alone is > 250 MB
