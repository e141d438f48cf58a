"""Params-only checkpoints: an orbax StandardCheckpointer tree of the model's params + config.json.

Layout of a checkpoint directory (what `llada-jax import-hf` writes and `train` can start from):

    CKPT/config.json   the model config (ModelConfig.to_hf_config(): HF fields + "llada_jax" run
                       settings, param_dtype included)
    CKPT/params/       orbax tree: {"wte": ..., "layers": {"q_proj": ...}, "ln_f": ..., ...}

    save_params("ckpt", model)
    cfg, model = load_params("ckpt", mesh=make_mesh({"fsdp": 8}))
"""

from __future__ import annotations

import json
import pathlib

import jax
import orbax.checkpoint as ocp
from flax import nnx

from llada_jax import sharding as sharding_lib
from llada_jax.model.config import ModelConfig
from llada_jax.model.modeling import LLaDAModel
from llada_jax.model.params import DTYPES, abstract_model

CONFIG_NAME = "config.json"
PARAMS_DIR = "params"


class CheckpointError(ValueError):
    """A params checkpoint directory that is missing or malformed."""


def save_params(path: str | pathlib.Path, model: LLaDAModel) -> pathlib.Path:
    """Writes `path`/params (orbax) and `path`/config.json; `path` must not hold a checkpoint."""
    path = pathlib.Path(path).absolute()
    if (path / PARAMS_DIR).exists():
        raise CheckpointError(f"{path / PARAMS_DIR} already exists; choose a new checkpoint path")
    path.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / PARAMS_DIR, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        (path / CONFIG_NAME).write_text(json.dumps(model.cfg.to_hf_config(), indent=2) + "\n")
    return path


def load_config(path: str | pathlib.Path, **run_settings) -> ModelConfig:
    config_path = pathlib.Path(path) / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} does not exist; is {path} a params checkpoint "
                              f"(made by `llada-jax import-hf`)?")
    return ModelConfig.from_hf_config(json.loads(config_path.read_text()), **run_settings)


def load_params(path: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None,
                rules: sharding_lib.Rules | None = None, dtype: str | None = None,
                **run_settings) -> tuple[ModelConfig, LLaDAModel]:
    """A checkpoint -> (cfg, model), params cast to `dtype` (param dtype) when given.

    With `mesh`, every param is restored straight into the sharding its logical axes get under
    `rules` (default sharding.DEFAULT_RULES); `run_settings` override causal, scan_layers,
    remat_policy, dtype (compute) via `compute_dtype`, attention_impl.
    """
    if "compute_dtype" in run_settings:
        run_settings["dtype"] = run_settings.pop("compute_dtype")
    cfg = load_config(path, **run_settings)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype)
    graphdef, state = nnx.split(abstract_model(cfg))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # multi-process: ours
        shardings = jax.tree.map(lambda _: device, state)
    else:
        shardings = sharding_lib.param_shardings(state, mesh, rules or sharding_lib.DEFAULT_RULES)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, DTYPES[cfg.param_dtype], sharding=s),
                          nnx.to_pure_dict(state), nnx.to_pure_dict(shardings))
    restored = ocp.StandardCheckpointer().restore(pathlib.Path(path).absolute() / PARAMS_DIR, target)
    nnx.replace_by_pure_dict(state, restored)
    return cfg, nnx.merge(graphdef, state)
