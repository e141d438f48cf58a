"""Training checkpoints: one orbax CheckpointManager holding state, data-iterator state and config.

Layout: `<workdir>/checkpoints/<step>/{state,data_iter,config}`. Saves are async (the step loop
goes on while the previous checkpoint is written); a run started in a workdir that has
checkpoints resumes from the latest one without being asked.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from llada_jax import checkpoints

from llada_jax.model import params

from llada_jax import sharding

from llada_jax.train import train_step
from llada_jax.model.config import ModelConfig


class TrainCheckpointer:
    def __init__(self, workdir: str | pathlib.Path, *, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            pathlib.Path(workdir).absolute() / "checkpoints", options=options,
            item_names=("state", "data_iter", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def save(self, step: int, state: Any, data_iter: Any, config: dict) -> None:
        args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if data_iter is not None:
            args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, step: int, abstract_state: Any, data_iter: Any) -> Any:
        """Restores the state onto the shardings of `abstract_state`; `data_iter` in place."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"]

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry their target sharding (what orbax restores onto)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, shardings)


MODEL_CONFIG = "config.json"  # in a train workdir: the student's ModelConfig.to_hf_config()


def load_model(path: str | pathlib.Path, *, step: int | None = None, mesh=None, rules=None):
    """(ModelConfig, LLaDAModel) from any of: a train workdir (latest or `step` checkpoint; only
    the params are read), a params checkpoint (`import-hf`), or an HF LLaDA directory."""
    path = pathlib.Path(path)
    if (path / "checkpoints").is_dir():
        cfg = ModelConfig.from_hf_config(json.loads((path / MODEL_CONFIG).read_text()))
        manager = ocp.CheckpointManager(path.absolute() / "checkpoints",
                                        options=ocp.CheckpointManagerOptions(read_only=True))
        step = manager.latest_step() if step is None else step
        if step is None:
            raise checkpoints.CheckpointError(f"{path}/checkpoints holds no finished checkpoint")
        graphdef, abstract = nnx.split(params.abstract_model(cfg), nnx.Param)
        mesh = mesh or sharding.make_mesh(devices=jax.devices()[:1])
        shardings = train_step.state_shardings(abstract, mesh, rules or sharding.DEFAULT_RULES)
        item = {"params": with_shardings(abstract, shardings)}
        restored = ocp.PyTreeCheckpointer().restore(
            path.absolute() / "checkpoints" / str(step) / "state",
            args=ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                        restore_args=ocp.checkpoint_utils.construct_restore_args(item)))
        return cfg, nnx.merge(graphdef, restored["params"])
    if (path / checkpoints.PARAMS_DIR).is_dir():
        return checkpoints.load_params(path, mesh=mesh, rules=rules)
    if (path / "config.json").is_file():
        return params.load_hf(path, mesh=mesh, rules=rules)
    raise checkpoints.CheckpointError(
        f"{path} is neither a train workdir (checkpoints/), a params checkpoint (params/) nor an "
        f"HF model directory (config.json + safetensors)")
