"""Installed = working: the wheel built from this tree, installed into a fresh venv outside the
source tree, runs `llada-jax demo --quick` from an empty folder end to end (the demo's own test:
the student aligns, its export evaluates and loads in PyTorch) and knows its shipped configs.

The venv reuses the dependencies already installed for the tests (a .pth file naming this
interpreter's site-packages), so nothing is downloaded; the dev install's editable finder is not
loaded there (a .pth in a directory named by a .pth is not processed), which the test checks.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parents[1]
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".hypothesis", "runs", "demo_out")


def _run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, (cmd, result.stdout[-2000:], result.stderr[-3000:])
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    source = root / "src"  # a clean copy: no stale build/ from earlier builds in the tree
    shutil.copytree(ROOT, source, symlinks=True, ignore=NOT_SOURCE)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--wheel-dir", str(root / "dist"), str(source)], timeout=600)
    wheel, = (root / "dist").glob("llada_jax-*.whl")
    env_dir = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)])
    site, = (env_dir / "lib").glob("python3*/site-packages")
    (site / "_test_deps.pth").write_text(
        "\n".join(sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})) + "\n")
    python = env_dir / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--no-deps", "--ignore-installed",
          "--no-index", str(wheel)], env=_clean_env(), timeout=600)
    shutil.rmtree(source)
    return env_dir


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.mark.slow
def test_the_installed_package_is_the_wheel_and_ships_its_configs(venv, tmp_path):
    probe = ("import llada_jax, llada_jax.train.config as c; print(llada_jax.__file__); "
             "print(c.shipped_configs()); print(c.load_config('llada_8b:v5p_32').data.global_batch_size)")
    lines = _run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path,
                 env=_clean_env()).stdout.splitlines()
    assert pathlib.Path(lines[0]).is_relative_to(venv)
    assert "tiny" in lines[1] and "llada_8b:v5e_64" in lines[1]
    assert lines[2] == "256"  # 16 chips x 16 sequences (configs/llada_8b.py)
    help_text = _run([str(venv / "bin" / "llada-jax"), "train", "--help"], cwd=tmp_path,
                     env=_clean_env()).stdout
    assert "llada_8b:v5p_32" in " ".join(help_text.split())


@pytest.mark.slow
def test_demo_quick_from_the_wheel_aligns_the_student_and_its_export_evaluates(venv, tmp_path):
    """`llada-jax demo --quick` (64 prompts, 12-token answers, 30 steps) from the wheel in an
    empty folder: the student moves towards the teacher, measured speculative decoding improves;
    `eval` re-run on the exported HF model gives the same metrics, and the export loads in
    PyTorch through its own remote code (`AutoModel`, trust_remote_code) with the same logits."""
    import json

    import numpy as np
    import torch
    from transformers import AutoModel

    from llada_jax.checkpoints import load_model

    demo = _run([str(venv / "bin" / "llada-jax"), "demo", "--quick"], cwd=tmp_path,
                env=_clean_env(), timeout=900)
    out = tmp_path / "demo_out"
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
    assert (out / "exported" / "model.safetensors").is_file()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "KL (teacher || student)" in demo.stdout

    # The eval command the demo prints, re-run with the installed CLI, with the teacher measuring.
    command = demo.stdout.split("llada-jax eval ")[1].split("\n")[0].split()
    site, = (venv / "lib").glob("python3*/site-packages")
    assets = site / "llada_jax" / "demo_assets"
    measure = ["--teacher", str(assets / "teacher"), "--teacher-tokenizer",
               str(assets / "teacher_tokenizer"), "--speculate-prompts", "4",
               "--speculate-new-tokens", "8"]
    again = _run([str(venv / "bin" / "llada-jax"), "eval", *command, *measure], cwd=tmp_path,
                 env=_clean_env(), timeout=600)
    exported = json.loads(again.stdout)["gamma=4"]
    for key in ("kl", "alpha_lower", "alpha_upper", "top1"):
        assert exported[key] == pytest.approx(after[key], abs=1e-5)
    for key in ("E_measured_greedy", "E_measured_sampled"):  # eval --teacher: beside E(γ)
        assert 1.0 <= exported[key] <= 5.0

    _, flax_model = load_model(out / "exported")
    torch_model = AutoModel.from_pretrained(out / "exported", trust_remote_code=True,
                                            dtype=torch.float32)
    tokens = np.random.default_rng(0).integers(0, flax_model.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        got = torch_model(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(got, np.asarray(flax_model(tokens)), atol=1e-5, rtol=0)
