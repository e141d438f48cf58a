"""Two processes on localhost (2 CPU devices each, gloo collectives) train the tiny config to the
same params as one process with 4 devices; each reads its own data shard; checkpoints written by
both processes restore in both."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT, final_params, free_port, make_dataset

STEPS = 6


def cmd(data_dir, workdir, *extra):
    return [sys.executable, "-m", "llada_jax", "train", "--config", str(ROOT / "configs/tiny.py"),
            "--workdir", str(workdir), "--no-progress", f"--config.data.dir={data_dir}",
            "--config.data.seq_len=64", "--config.data.global_batch_size=4",
            "--config.data.num_shards=2", "--config.mesh.fsdp=2", "--config.optim.lr=3e-3",
            f"--config.train.num_steps={STEPS}", "--config.train.num_epochs=1000",
            "--config.train.checkpoint_every=3", "--config.train.eval_every=0", *extra]


def env(devices: int):
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    return e


def run_two_processes(data_dir, workdir):
    address = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(cmd(data_dir, workdir, "--coordinator-address", address,
                                  "--num-processes", "2", "--process-id", str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env(2)) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outs]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    data_dir = make_dataset(str(tmp_path / "data"), n=64)
    single = tmp_path / "single"
    result = subprocess.run(cmd(data_dir, single), capture_output=True, text=True, env=env(4),
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    multi = tmp_path / "multi"
    run_two_processes(data_dir, multi)
    assert_bit_identical_or_close(final_params(multi), final_params(single))

    # Restore across processes: drop the last checkpoint, both processes resume from step 3.
    shutil.rmtree(multi / "checkpoints" / str(STEPS))
    outs = run_two_processes(data_dir, multi)
    assert all("resumed from step 3" in out for out in outs)
    assert_bit_identical_or_close(final_params(multi), final_params(single))


def assert_bit_identical_or_close(a, b):
    import jax
    import numpy as np

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
