"""Installed = working: the wheel built from this tree, installed into a fresh venv outside the
source tree, runs `llada-jax demo --quick` from an empty folder and knows its shipped configs.

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
def test_demo_quick_runs_from_the_wheel_in_an_empty_folder(venv, tmp_path):
    result = _run([str(venv / "bin" / "llada-jax"), "demo", "--quick"], cwd=tmp_path,
                  env=_clean_env(), timeout=900)
    assert "KL (teacher || student)" in result.stdout
    assert (tmp_path / "demo_out" / "exported" / "model.safetensors").is_file()
    assert (tmp_path / "demo_out" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
