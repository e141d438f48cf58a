"""`llada-jax onpolicy` as a user runs it: killed with SIGKILL in the middle of writing a round's
records, then in the middle of the round's training, resumed each time, and compared with an
uninterrupted run: the same records and bit-identical final parameters."""

import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_pipeline import records
from llada_jax.commands.demo import ASSETS
from tests.helpers import ROOT, assert_bit_identical, env, final_params, run_to_end


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from llada_jax.commands.demo import make_teacher_data

    return make_teacher_data(tmp_path_factory.mktemp("onpolicy_data"), 6, 8, 16)


def onpolicy_cmd(data_dir, workdir):
    return [sys.executable, "-m", "llada_jax", "onpolicy", "--config", str(ROOT / "configs/tiny.py"),
            "--workdir", str(workdir), "--no-progress", "--rounds", "1", "--steps-per-round", "2",
            "--teacher", str(ASSETS / "teacher"), f"--config.data.dir={data_dir}",
            "--config.data.seq_len=64", "--config.data.global_batch_size=4",
            "--config.train.num_steps=4", "--config.train.checkpoint_every=1",
            "--config.train.eval_every=0", "--config.model.n_layers=1",
            "--config.onpolicy.prompts_per_round=2", "--config.onpolicy.max_new_tokens=6"]


def kill_when(cmd, ready) -> None:
    """Starts the run, SIGKILLs it as soon as ready() holds (it must still be running)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env())
    deadline = time.time() + 400
    while not ready():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the kill point never came"
        time.sleep(0.005)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def round_examples(workdir: pathlib.Path, r: int) -> list[dict]:
    return list(records.open_split(str(workdir / "rounds" / f"round_{r:03d}"), "train"))


@pytest.mark.slow
def test_kill_mid_training_and_mid_collection_then_resume(data_dir, tmp_path):
    straight = tmp_path / "straight"
    run_to_end(onpolicy_cmd(data_dir, straight))

    workdir = tmp_path / "killed"
    cmd = onpolicy_cmd(data_dir, workdir)
    # In round 0's collection (offline training ends at step 2): its records are being written.
    partial = workdir / "rounds/round_000.partial/teacher_targets"
    kill_when(cmd, lambda: partial.is_dir() and any(partial.glob("incomplete*")))
    assert not (workdir / "rounds/round_000").exists()  # never visible half-written
    # In round 0's training (it ends at step 4).
    kill_when(cmd, lambda: (workdir / "train/checkpoints/3/_CHECKPOINT_METADATA").exists())
    resumed = run_to_end(cmd)
    assert "resumed from step 3" in resumed.stdout
    assert "collected" not in resumed.stdout  # the finished round is reused

    assert not list((workdir / "rounds").glob("*.partial"))
    want, got = round_examples(straight, 0), round_examples(workdir, 0)
    assert len(want) == len(got) > 0
    for a, b in zip(want, got):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert_bit_identical(final_params(workdir / "train"), final_params(straight / "train"))
