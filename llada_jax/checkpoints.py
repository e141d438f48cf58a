"""Checkpoints: every kind of model directory this project reads, and the two it writes.

    CKPT/config.json, CKPT/params/      a params checkpoint (`import-hf`, `save_params`): the model
                                        config (ModelConfig.to_hf_config(): HF fields + "llada_jax"
                                        run settings) and an orbax tree of the params
    W/config.json, W/checkpoints/<step>/{state,data_iter,config}
                                        a train workdir (`train`, TrainCheckpointer): the student's
                                        config and one orbax step dir per kept checkpoint
    HF/config.json + *.safetensors      an HF LLaDA directory (model/params.py converts it)

`load_model(path)` reads any of them (a workdir's latest checkpoint, or `step=N`; a step dir
itself), restoring each param straight into the sharding its logical axes get on `mesh`:

    cfg, model = load_model("runs/tiny")                    # or a params checkpoint, an HF dir
    save_params("ckpt", model)
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from llada_jax import sharding as sharding_lib
from llada_jax.errors import CheckpointError
from llada_jax.model import params as hf_params
from llada_jax.model.config import DTYPES, ModelConfig
from llada_jax.model.modeling import LLaDAModel

CONFIG_NAME = "config.json"   # the model config, in a params checkpoint, a workdir and an HF dir
PARAMS_DIR = "params"
STEPS_DIR = "checkpoints"     # of a train workdir
STATE_ITEM = "state"          # of a train step dir

_KINDS = {"params": "a params checkpoint", "workdir": "a train workdir",
          "step": "a train checkpoint step dir", "hf": "an HF model directory",
          None: "neither a params checkpoint, a train workdir, a step dir nor an HF model dir"}


def checkpoint_kind(path: str | pathlib.Path) -> str | None:
    """'params' | 'workdir' | 'step' | 'hf', or None for a missing or unrecognised path."""
    path = pathlib.Path(path)
    if (path / PARAMS_DIR).is_dir() and (path / CONFIG_NAME).is_file():
        return "params"
    if (path / STEPS_DIR).is_dir():
        return "workdir"
    if (path / STATE_ITEM).is_dir() and path.parent.name == STEPS_DIR:
        return "step"
    if (path / CONFIG_NAME).is_file() and any(path.glob("*.safetensors*")):
        return "hf"
    return None


def describe_kind(kind: str | None) -> str:
    return _KINDS[kind]


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
        write_model_config(path, model.cfg)
    return path


def write_model_config(directory: str | pathlib.Path, cfg: ModelConfig) -> None:
    text = json.dumps(cfg.to_hf_config(), indent=2) + "\n"
    (pathlib.Path(directory) / CONFIG_NAME).write_text(text)


def load_config(path: str | pathlib.Path, **run_settings) -> ModelConfig:
    """The ModelConfig of a params checkpoint or a train workdir."""
    config_path = pathlib.Path(path) / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} does not exist; is {path} a params checkpoint "
                              f"(made by `llada-jax import-hf`) or a train workdir?")
    return ModelConfig.from_hf_config(json.loads(config_path.read_text()), **run_settings)


def _restore_target(cfg: ModelConfig, mesh, rules):
    """(graphdef, abstract params State whose ShapeDtypeStructs carry their shardings)."""
    graphdef, state = nnx.split(hf_params.abstract_model(cfg), nnx.Param)
    # Without a mesh: this process's first device (in a multi-process run, not process 0's).
    mesh = mesh or sharding_lib.make_mesh(devices=jax.local_devices()[:1])
    shardings = sharding_lib.param_shardings(state, mesh, rules or sharding_lib.DEFAULT_RULES)
    dtype = DTYPES[cfg.param_dtype]
    target = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, dtype, sharding=s)),
                          state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return graphdef, target


def load_params(path: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None,
                rules: sharding_lib.Rules | None = None, dtype: str | None = None,
                **run_settings) -> tuple[ModelConfig, LLaDAModel]:
    """A params checkpoint -> (cfg, model), params cast to `dtype` (param dtype) when given.

    `run_settings` override causal, scan_layers, remat_policy, dtype (compute) via
    `compute_dtype`, attention_impl.
    """
    if "compute_dtype" in run_settings:
        run_settings["dtype"] = run_settings.pop("compute_dtype")
    cfg = load_config(path, **run_settings)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype)
    graphdef, target = _restore_target(cfg, mesh, rules)
    restored = ocp.StandardCheckpointer().restore(pathlib.Path(path).absolute() / PARAMS_DIR,
                                                  nnx.to_pure_dict(target))
    nnx.replace_by_pure_dict(target, restored)
    return cfg, nnx.merge(graphdef, target)


def _load_step(step_dir: pathlib.Path, mesh, rules, **overrides) -> tuple[ModelConfig, LLaDAModel]:
    """Only the params of a train step dir; the config is its workdir's."""
    cfg = load_config(step_dir.parent.parent).replace(**overrides)
    graphdef, target = _restore_target(cfg, mesh, rules)
    item = {"params": target}
    restored = ocp.PyTreeCheckpointer().restore(
        step_dir.absolute() / STATE_ITEM,
        args=ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                    restore_args=ocp.checkpoint_utils.construct_restore_args(item)))
    return cfg, nnx.merge(graphdef, restored["params"])


def workdir_steps(workdir: str | pathlib.Path) -> list[int]:
    manager = ocp.CheckpointManager(pathlib.Path(workdir).absolute() / STEPS_DIR,
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    return list(manager.all_steps())


def load_model(path: str | pathlib.Path, *, step: int | None = None, mesh=None, rules=None,
               dtype: str | None = None, compute_dtype: str | None = None,
               causal: bool | None = None, role: str = "") -> tuple[ModelConfig, LLaDAModel]:
    """(ModelConfig, LLaDAModel) from a params checkpoint, a train workdir (its latest
    checkpoint, or `step`), a train step dir or an HF LLaDA / LLaMA directory (see the module
    docstring): the one loader every command uses.

    `dtype` casts the params, `compute_dtype` sets the compute dtype (default: the checkpoint's).
    `causal` True / False: the model must be a causal LM (a teacher) / a bidirectional LLaDA
    (a student or drafter), else a CheckpointError that names `role` (e.g. "--teacher").
    """
    path = pathlib.Path(path)
    who = f"{role} {path}".strip()
    if not path.exists():
        raise CheckpointError(f"{who} does not exist")
    kind = checkpoint_kind(path)
    if step is not None and kind != "workdir":
        raise CheckpointError(f"a step ({step}) was given but {path} is {describe_kind(kind)}; "
                              f"--step picks a checkpoint of a train workdir")
    overrides = {k: v for k, v in (("param_dtype", dtype), ("dtype", compute_dtype)) if v}
    if kind is None:
        raise CheckpointError(f"{who} is {describe_kind(None)} (a params checkpoint has "
                              f"{CONFIG_NAME} + {PARAMS_DIR}/, a workdir {STEPS_DIR}/, an HF dir "
                              f"{CONFIG_NAME} + *.safetensors)")
    if causal is not None:
        _check_causal(path if kind in ("params", "hf") else path.parent.parent if kind == "step"
                      else path, causal, role)
    settings = {"compute_dtype": compute_dtype} if compute_dtype else {}
    if kind == "params":
        return load_params(path, mesh=mesh, rules=rules, dtype=dtype, **settings)
    if kind == "hf":
        return hf_params.load_hf(path, mesh=mesh, rules=rules, dtype=dtype, **settings)
    if kind == "step":
        return _load_step(path, mesh, rules, **overrides)
    steps = workdir_steps(path)
    if not steps:
        raise CheckpointError(f"{path / STEPS_DIR} holds no finished checkpoint; train "
                              f"longer (train.checkpoint_every) or pick another workdir")
    if step is not None and step not in steps:
        raise CheckpointError(f"{path} has no checkpoint at step {step}; it has {steps}")
    return _load_step(path / STEPS_DIR / str(max(steps) if step is None else step), mesh, rules,
                      **overrides)


def _check_causal(config_dir: pathlib.Path, causal: bool, role: str) -> None:
    """Refuses a causal LM where a LLaDA is wanted, and the reverse, from config.json alone."""
    if load_config(config_dir).causal == causal:
        return
    who = f"{role} {config_dir}".strip()
    if causal:
        raise CheckpointError(f"{who} is a bidirectional LLaDA (masked-diffusion) model; it must "
                              f"be a causal LM (LLaMA-style)")
    raise CheckpointError(f"{who} is a causal LLaMA model; the student must be a LLaDA "
                          f"(masked-diffusion) checkpoint")


def peek_config(path: str | pathlib.Path) -> ModelConfig | None:
    """The ModelConfig of any checkpoint `load_model` reads, without reading its params (None
    for a path that is no checkpoint: load_model says why)."""
    path = pathlib.Path(path)
    kind = checkpoint_kind(path)
    if kind in ("params", "workdir", "hf"):
        return ModelConfig.from_hf_config(json.loads((path / CONFIG_NAME).read_text()))
    if kind == "step":
        return load_config(path.parent.parent)
    return None


class TrainCheckpointer:
    """The train workdir's orbax CheckpointManager: state, data-iterator state and config.

    Saves are async (the step loop goes on while the previous checkpoint is written); a run
    started in a workdir that has checkpoints resumes from the latest one without being asked.
    """

    def __init__(self, workdir: str | pathlib.Path, *, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            pathlib.Path(workdir).absolute() / STEPS_DIR, options=options,
            item_names=(STATE_ITEM, "data_iter", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def save(self, step: int, state: Any, data_iter: Any, config: dict) -> None:
        args = {STATE_ITEM: ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if data_iter is not None:
            args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, step: int, abstract_state: Any, data_iter: Any) -> Any:
        """Restores the state onto the shardings of `abstract_state`; `data_iter` in place."""
        args = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**args))[STATE_ITEM]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
