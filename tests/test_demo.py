"""`llada-jax demo` end to end on a small slice; `eval` re-run on its exported HF model, which
also loads in PyTorch through its own remote code (`AutoModel`, trust_remote_code)."""

import json
import subprocess
import sys

import pytest


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
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "KL (teacher || student)" in demo.stdout

    command = demo.stdout.split("llada-jax eval ")[1].split("\n")[0].split()
    again = subprocess.run([sys.executable, "-m", "llada_jax", "eval", *command],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    exported = json.loads(again.stdout)["gamma=4"]
    for key in ("kl", "alpha_lower", "alpha_upper", "top1"):
        assert exported[key] == pytest.approx(after[key], abs=1e-5)

    # The export loads in PyTorch with the remote code it carries, and gives the same logits.
    import numpy as np
    import torch
    from transformers import AutoModel

    from llada_jax.checkpoints import load_model

    _, flax_model = load_model(out / "exported")
    torch_model = AutoModel.from_pretrained(out / "exported", trust_remote_code=True,
                                            dtype=torch.float32)
    tokens = np.random.default_rng(0).integers(0, flax_model.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        got = torch_model(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(got, np.asarray(flax_model(tokens)), atol=1e-5, rtol=0)
