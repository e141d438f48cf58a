"""Training checkpoints: one orbax CheckpointManager holding state, data-iterator state and config.

Layout: `<workdir>/checkpoints/<step>/{state,data_iter,config}`. Saves are async (the step loop
goes on while the previous checkpoint is written); a run started in a workdir that has
checkpoints resumes from the latest one without being asked.
"""

from __future__ import annotations

import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class TrainCheckpointer:
    def __init__(self, workdir: str | pathlib.Path, *, save_every: int, keep: int,
                 async_save: bool = True):
        self.save_every = max(int(save_every), 1)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            pathlib.Path(workdir).absolute() / "checkpoints", options=options,
            item_names=("state", "data_iter", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return step % self.save_every == 0 or self.manager.reached_preemption(step)

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


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for `restore`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
