"""generate-teacher on two processes (localhost, 2 CPU devices each, gloo collectives) that
decode together with ONE teacher sharded over the global mesh (--mesh tensor=4: every head,
MLP and vocabulary matrix split across both processes), loaded from an HF dir or a params
checkpoint: the JSON route's tokens and full logits and the records route's dataset equal a
single process's, and each is written once."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import llama_fixtures as lf
from data_pipeline import records, toy_tokenizers
from llada_jax import cli
from tests.test_multihost import free_port

# 5 prompts over 2 processes, 2 per batch: shares of 3 and 2, so in the second round process 1
# has no prompt left and still takes part; the prompt lengths fall in two buckets.
PROMPTS = ["the cat sat", "a quick brown fox jumps over the lazy dog near the river bank", "dog",
           "on the mat and", "river"]
NEW, TOP_K = 8, 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost_teacher")
    hf_dir, _ = lf.write_llama_teacher(root / "teacher", vocab_multiple=4, num_key_value_heads=4)
    student = root / "student"
    student.mkdir()
    toy_tokenizers.sentencepiece_bpe(lf.TEXT * 4, 280).save(str(student / "tokenizer.json"))
    (root / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    common = ["generate-teacher", "--prompts", str(root / "p.txt"),
              "--greedy", "--max-new-tokens", str(NEW), "--batch-size", "2"]
    json_args = [*common, "--teacher", str(hf_dir), "--full-logits"]
    # The records route reads the teacher from an imported params checkpoint (orbax restores
    # each process's shards), the JSON route from the HF dir (read tensor by tensor).
    assert cli.main(["import-hf", "--hf-dir", str(hf_dir), "--out", str(root / "ckpt")]) == 0
    records_args = [*common, "--teacher", str(root / "ckpt"), "--tokenizer", str(hf_dir),
                    "--student-tokenizer", str(student), "--top-k", str(TOP_K),
                    "--max-length", "64", "--record-format", "1"]
    # The single-process references (one device, no mesh).
    assert cli.main([*json_args, "--out", str(root / "one.jsonl")]) == 0
    assert cli.main([*records_args, "--records", str(root / "one_records")]) == 0
    return root, json_args, records_args


def _launch(args):
    address = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "llada_jax", *args, "--mesh", "data=1,tensor=4",
         "--coordinator-address", address, "--num-processes", "2", "--process-id", str(i)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    return [p.returncode for p in procs], outs


def _two_processes(args):
    codes, outs = _launch(args)
    for code, (_, err) in zip(codes, outs):
        assert code == 0, err[-3000:]
    stdouts = [out for out, _ in outs]
    for rank, out in enumerate(stdouts):  # each process holds about half the teacher
        share = re.search(rf"process {rank} of 2 holds ([\d.]+)% of the teacher's parameter", out)
        assert share and 45 < float(share.group(1)) < 60, out
    return stdouts


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_sharded_teacher_json_route_equals_one_process(setup):
    root, json_args, _ = setup
    outs = _two_processes([*json_args, "--out", str(root / "two.jsonl")])
    assert "wrote 5 records" in outs[0] and "wrote" not in outs[1]  # one writer
    one, two = _jsonl(root / "one.jsonl"), _jsonl(root / "two.jsonl")
    assert [r["prompt"] for r in two] == PROMPTS == [r["prompt"] for r in one]
    for a, b in zip(one, two):
        assert a["response"] == b["response"]
        assert [e["chosen_token_id"] for e in a["logits"]] == [e["chosen_token_id"] for e in b["logits"]]
        assert ([[t["token_id"] for t in e["top_5"]] for e in a["logits"]]
                == [[t["token_id"] for t in e["top_5"]] for e in b["logits"]])
        full_a = np.array([e["full_logits"] for e in a["logits"]])
        full_b = np.array([e["full_logits"] for e in b["logits"]])
        # Both files round to 5 decimals: fp32 noise far below 1e-5 moves a value at most
        # one rounding unit.
        assert full_a.shape == full_b.shape and np.abs(full_a - full_b).max() <= 1.0001e-5
    assert sum(len(r["logits"]) for r in one) > len(PROMPTS)  # not all stopped at once


@pytest.mark.slow
def test_sharded_teacher_records_route_equals_one_process(setup):
    root, _, records_args = setup
    outs = _two_processes([*records_args, "--records", str(root / "two_records")])
    with open(os.path.join(records.dataset_dir(str(root / "one_records")), "report.json")) as f:
        written = json.load(f)["written"]
    assert written >= 4 and f'"written": {written}' in outs[0] and '"written"' not in outs[1]
    for split in records.SPLITS:
        one = [dict(e) for e in records.open_split(str(root / "one_records"), split)]
        two = [dict(e) for e in records.open_split(str(root / "two_records"), split)]
        assert [e["example_id"] for e in one] == [e["example_id"] for e in two]
        for x, y in zip(one, two):
            for key in ("tokens", "prompt_length", "target_mask_bits", "teacher_ids", "tail_known"):
                np.testing.assert_array_equal(x[key], y[key], err_msg=key)
            finite = np.isfinite(x["teacher_logprobs"])
            assert (finite == np.isfinite(y["teacher_logprobs"])).all()
            np.testing.assert_allclose(x["teacher_logprobs"][finite],
                                       y["teacher_logprobs"][finite], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_bad_prompt_on_one_process_stops_both(setup):
    """Prompt 1 (process 1's first) is too long for the teacher: process 1 names it, process 0
    says which process stopped, both exit 2 (neither waits forever for the other)."""
    root, json_args, _ = setup
    (root / "bad.txt").write_text("dog\n" + "the cat sat " * 60 + "\nriver\n")
    args = [a if a != str(root / "p.txt") else str(root / "bad.txt") for a in json_args]
    codes, outs = _launch([*args, "--out", str(root / "bad.jsonl")])
    assert codes == [2, 2]
    assert "prompt 1 has" in outs[1][1] and "max_sequence_length" in outs[1][1]
    assert "process 1 stopped on a bad prompt" in outs[0][1]
