"""`llada-jax demo` end to end on a small slice; `eval` re-run on its exported HF model, which
also loads in PyTorch through its own remote code (`AutoModel`, trust_remote_code)."""

import json
import pathlib
import subprocess
import sys

import pytest

import llada_jax


@pytest.mark.slow
def test_demo_small_run_and_eval_of_the_export(tmp_path):
    out = tmp_path / "demo"
    demo = subprocess.run(
        [sys.executable, "-m", "llada_jax", "demo", "--out", str(out), "--max-prompts", "64",
         "--max-new-tokens", "12", "--steps", "30"], capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    before, after = results["before"], results["after"]
    assert after["kl"] < before["kl"] - 0.3          # the student moved towards the teacher
    assert after["alpha_lower"] > before["alpha_lower"]
    for r in (before, after):
        assert 0.0 <= r["alpha_lower"] <= r["alpha_upper"] <= 1.0
        assert r["E_lower"] == pytest.approx(sum(r["alpha_lower"] ** j for j in range(5)))
    # Measured speculative decoding: greedy output is the teacher's own; the aligned student
    # gets more teacher tokens per target call than the untrained one.
    for r in (before, after):
        assert r["speculate_greedy"]["all_equal_teacher_greedy"]
        assert 1.0 <= r["measured_sampled"] <= 5.0
    assert after["measured_greedy"] > before["measured_greedy"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "KL (teacher || student)" in demo.stdout

    command = demo.stdout.split("llada-jax eval ")[1].split("\n")[0].split()
    assets = pathlib.Path(llada_jax.__file__).parent / "demo_assets"
    measure = ["--teacher", str(assets / "teacher"), "--teacher-tokenizer",
               str(assets / "teacher_tokenizer"), "--speculate-prompts", "4",
               "--speculate-new-tokens", "8"]
    again = subprocess.run([sys.executable, "-m", "llada_jax", "eval", *command, *measure],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    exported = json.loads(again.stdout)["gamma=4"]
    for key in ("kl", "alpha_lower", "alpha_upper", "top1"):
        assert exported[key] == pytest.approx(after[key], abs=1e-5)
    for key in ("E_measured_greedy", "E_measured_sampled"):  # eval --teacher: beside E(γ)
        assert 1.0 <= exported[key] <= 5.0

    # The export loads in PyTorch with the remote code it carries, and gives the same logits.
    import numpy as np
    import torch
    from transformers import AutoModel

    from llada_jax.train.checkpointing import load_model

    _, flax_model = load_model(out / "exported")
    torch_model = AutoModel.from_pretrained(out / "exported", trust_remote_code=True,
                                            dtype=torch.float32)
    tokens = np.random.default_rng(0).integers(0, flax_model.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        got = torch_model(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(got, np.asarray(flax_model(tokens)), atol=1e-5, rtol=0)
