"""`llada-jax train` refuses bad configs with a message that says what to do (exit 2)."""

import pathlib

import pytest

from llada_jax.cli import main
from tests.helpers import make_dataset

ROOT = pathlib.Path(__file__).parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("cli")), n=24)


@pytest.mark.parametrize("config, overrides, message", [
    ("tiny.py", [], "data.dir is empty"),
    ("tiny.py", ["--config.optim.lr=fast"], "--config.optim.lr=fast: expected a float"),
    ("tiny.py", ["--config.optim.learning_rate=1e-3"], "unknown config field 'optim.learning_rate'"),
    ("missing.py", [], "does not exist"),
    ("llada_8b.py:v5e_64", ["DATA", "--config.mesh.fsdp=8"], "model.init is empty"),
    ("llada_8b.py:v5e_64", ["DATA"], "needs 64 devices, 8 are available"),
    ("llada_8b.py:v9", [], "unknown llada_8b variant"),
    ("tiny.py", ["DATA", "--config.model.init=/nonexistent"], "/nonexistent"),
    ("tiny.py", ["DATA", "--config.data.num_shards=3"], "data.num_shards=3"),
])
def test_bad_configs_exit_2_with_a_message(config, overrides, message, data_dir, tmp_path, capsys):
    overrides = [f"--config.data.dir={data_dir}" if o == "DATA" else o for o in overrides]
    code = main(["train", "--config", str(ROOT / "configs" / config), "--workdir",
                 str(tmp_path), *overrides])
    assert code == 2
    assert message in capsys.readouterr().err
