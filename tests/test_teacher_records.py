"""generate-teacher --records equals the JSON route (generate-teacher --full-logits, then
preprocess) record for record, in one process and in two (localhost, gloo collectives)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import llama_fixtures as lf
from data_pipeline import records, toy_tokenizers
from llada_jax import cli
from tests.helpers import free_port

PROMPTS = ["the cat sat", "a quick brown fox jumps over", "dog", "the lazy dog near the",
           "on the mat and", "river"]
NEW, TOP_K, MAX_LENGTH = 10, 8, 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    hf_dir, tok = lf.write_llama_teacher(root / "teacher")
    student = root / "student"
    student.mkdir()
    toy_tokenizers.sentencepiece_bpe(lf.TEXT * 4, 280).save(str(student / "tokenizer.json"))
    (root / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    common = ["generate-teacher", "--teacher", str(hf_dir), "--prompts", str(root / "p.txt"),
              "--greedy", "--max-new-tokens", str(NEW), "--batch-size", "2"]
    # The JSON route ...
    assert cli.main([*common, "--full-logits", "--out", str(root / "t.jsonl")]) == 0
    assert cli.main(["preprocess", "--input", str(root / "t.jsonl"), "--out", str(root / "json_route"),
                     "--student-tokenizer", str(student), "--teacher-tokenizer", str(hf_dir),
                     "--teacher-vocab-size", str(len(tok)), "--max-length", str(MAX_LENGTH),
                     "--top-k", str(TOP_K), "--workers", "1", "--record-format", "1"]) == 0
    # ... and the direct one.
    # Format 1 (float32 log-probs) on both routes: format 2's per-position quantisation grid
    # would turn the JSON's 5-decimal rounding into whole grid steps.
    records_args = [*common, "--student-tokenizer", str(student), "--top-k", str(TOP_K),
                    "--max-length", str(MAX_LENGTH), "--record-format", "1"]
    assert cli.main([*records_args, "--records", str(root / "direct")]) == 0
    return root, records_args


def _examples(data_dir):
    return {split: [dict(e) for e in records.open_split(str(data_dir), split)]
            for split in records.SPLITS}


def _report(data_dir):
    with open(os.path.join(records.dataset_dir(str(data_dir)), "report.json")) as f:
        return json.load(f)


def _assert_same_datasets(a_dir, b_dir):
    a, b = _examples(a_dir), _examples(b_dir)
    assert sum(map(len, a.values())) == len(PROMPTS)
    for split in records.SPLITS:
        assert [e["example_id"] for e in a[split]] == [e["example_id"] for e in b[split]]
        for x, y in zip(a[split], b[split]):
            for key in ("tokens", "prompt_length", "target_mask_bits", "teacher_ids", "tail_known"):
                np.testing.assert_array_equal(x[key], y[key], err_msg=key)
            # The JSON route rounds logits to 5 decimals; the direct one keeps float32.
            finite = np.isfinite(x["teacher_logprobs"])
            assert (finite == np.isfinite(y["teacher_logprobs"])).all()
            np.testing.assert_allclose(x["teacher_logprobs"][finite], y["teacher_logprobs"][finite],
                                       atol=2e-5)
            assert x["tail_known"]


def test_records_route_equals_json_route(setup):
    root, _ = setup
    _assert_same_datasets(root / "json_route", root / "direct")
    via_json, direct = _report(root / "json_route"), _report(root / "direct")
    for key in ("read", "written", "skipped", "coverage", "written_per_split"):
        assert via_json[key] == direct[key], key
    teacher_tokens = sum(len(json.loads(line)["logits"])
                         for line in (root / "t.jsonl").read_text().splitlines())
    print(f"\nbytes per teacher token: JSON {os.path.getsize(root / 't.jsonl') / teacher_tokens:,.0f}"
          f" (vocab {direct['metadata']['options']['teacher_vocab_size']}); records "
          f"{direct['bytes_on_disk'] / teacher_tokens:,.0f} (top-{TOP_K}, tiny shards)")


@pytest.mark.slow
def test_two_processes_write_the_same_dataset_once(setup):
    root, records_args = setup
    address = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "llada_jax", *records_args, "--records", str(root / "two"),
         "--coordinator-address", address, "--num-processes", "2", "--process-id", str(i)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert '"written": 6' in outs[0][0] and '"written"' not in outs[1][0]  # one writer
    _assert_same_datasets(root / "direct", root / "two")
