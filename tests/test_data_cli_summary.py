"""What `llada-jax preprocess` tells a person: the human summary on stderr and the exit code."""

import json
import os

import numpy as np
from tokenizers import Tokenizer

from llada_jax import cli
from tests.helpers import make_tokenizers, teacher_record, write_json


def test_original_sample_shape_every_record_skipped_is_explained(tmp_path, capfd):
    """The original's sample: full_logits of 10 values against a bigger teacher vocabulary."""
    tdir, sdir = make_tokenizers(str(tmp_path))
    tok = Tokenizer.from_file(f"{tdir}/tokenizer.json")
    rng = np.random.default_rng(0)
    recs = [teacher_record(tok, "Q: ", text, rng) for text in ("Paris is cold.", "Snow falls.")]
    for rec in recs:
        for entry in rec["logits"]:
            entry["full_logits"] = entry["full_logits"][:10]
    src = write_json(str(tmp_path / "llama_logits.json"), recs)
    out = str(tmp_path / "out")
    rc = cli.main(["preprocess", "--input", src, "--out", out, "--student-tokenizer", sdir,
                   "--teacher-tokenizer", tdir, "--max-length", "64", "--workers", "1"])
    captured = capfd.readouterr()
    assert rc == 1
    err = captured.err
    assert "read 2 records, wrote 0 (none), skipped 2" in err
    assert "skipped 2 as full_logits_wrong_length" in err
    vocab = tok.get_vocab_size(with_added_tokens=True)
    assert f"{src} record 0: logits[0].full_logits has 10 values, expected {vocab}" in err
    # Nothing written: no dataset that looks finished; the report and listing wait in --out.
    assert not os.path.exists(os.path.join(out, "teacher_targets", "1.0.0"))
    dataset = out
    assert os.path.join(dataset, "skipped.jsonl") in err
    assert os.path.join(dataset, "report.json") in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("Nothing was written: every record was skipped, most as "
                           "full_logits_wrong_length;") and "--teacher-tokenizer" in last
    assert "Downloading and preparing" not in captured.out + err
    assert "Traceback" not in captured.out + err
    assert json.loads(captured.out)["written"] == 0
    listing = [json.loads(line) for line in open(os.path.join(dataset, "skipped.jsonl"))]
    assert [s["reason"] for s in listing] == ["full_logits_wrong_length"] * 2


def test_summary_of_a_good_run(tmp_path, capfd):
    tdir, sdir = make_tokenizers(str(tmp_path))
    tok = Tokenizer.from_file(f"{tdir}/tokenizer.json")
    rng = np.random.default_rng(1)
    recs = [teacher_record(tok, "Q: ", "Paris is cold.", rng), {"prompt": 3}]
    src = write_json(str(tmp_path / "in.json"), recs)
    rc = cli.main(["preprocess", "--input", src, "--out", str(tmp_path / "out"),
                   "--student-tokenizer", sdir, "--teacher-tokenizer", tdir,
                   "--max-length", "64", "--workers", "1", "--validation-fraction", "0"])
    err = capfd.readouterr().err
    assert rc == 0
    assert "read 2 records, wrote 1 (1 train), skipped 1" in err
    assert "skipped 1 as wrong_type" in err and "record 1: prompt is int, expected str" in err
    assert "coverage: vocab matched" in err and "bytes per response token" in err
    assert "Nothing was written" not in err
