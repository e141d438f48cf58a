"""The training config: one schema with the original system's defaults, loading, overrides and
the validation of every field.

Configs shipped with the package live in `configs/` (installed as `llada_jax.configs`): they
start from `default_config()` and change what differs (`tiny.py` shrinks it for CPU,
`llada_8b.py` sizes it for a TPU slice), so every config has the same fields and
`--config.a.b=v` overrides work on all of them. `--config` takes a shipped name (`tiny`,
`llada_8b:v5e_64`) or a file path (`my_config.py`, `my_config.py:variant`); a file exposes
`get_config()` or `get_config(variant)`, like ml_collections' `config_flags`.

Defaults have one home each: the model's run settings are ModelConfig's, the loss settings
are `distill.loss.LossConfig`'s (which also holds their cross-field rules), the sharding rules
are `sharding.DEFAULT_RULES`. `validate()` checks every field when the config is loaded,
before any data, checkpoint or device is touched.
"""

from __future__ import annotations

import ast
import difflib
import dataclasses
import importlib
import importlib.resources
import importlib.util
import math
import os
import pathlib

import ml_collections

from data_pipeline import loader as data_loader
from data_pipeline import records
from llada_jax import checkpoints
from llada_jax import sharding
from llada_jax.errors import ConfigError
from llada_jax.model.config import ModelConfig, run_setting_choices, run_setting_defaults
from llada_jax.distill import loss as loss_lib

SHIPPED = "llada_jax.configs"
# The ModelConfig run settings a training config sets (a student is never causal).
RUN_FIELDS = ("scan_layers", "remat_policy", "param_dtype", "dtype", "attention_impl")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.init = ""                  # a params checkpoint dir from `import-hf`, or "random"
    c.model.init_seed = 0
    c.model.mask_token = ""            # random init: "" = the student tokenizer's <|mdm_mask|>, ...
    # Architecture, used by random init only (a checkpoint brings its own): LLaDA-8B.
    c.model.d_model = 4096
    c.model.n_heads = 32
    c.model.n_kv_heads = 32
    c.model.n_layers = 32
    c.model.mlp_hidden_size = 12288
    c.model.rope_theta = 500000.0
    # Run settings (ModelConfig's defaults): scan_layers, remat_policy (none | full | dots),
    # param_dtype, dtype (compute), attention_impl (xla | dot_product_attention | splash).
    c.model.update({k: v for k, v in run_setting_defaults().items() if k in RUN_FIELDS})

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""                    # a `llada-jax preprocess` output dir (required)
    c.data.seq_len = 4096
    c.data.global_batch_size = 2
    c.data.seed = 0
    c.data.pack = True
    c.data.num_shards = 0              # data shards (0: one per process); keep it to resume
    c.data.eval_split = "validation"
    # Train on several datasets at once: ((dir, weight), ...), e.g. offline and on-policy
    # records (loader.make_loader's mix; needs train.num_steps). data.dir still gives the
    # metadata and the eval split. () = train on data.dir alone.
    c.data.mix = ()

    # The distillation objective: every field and its meaning is distill.loss.LossConfig's
    # (kind, temperature, the LM-head cut, mask mode, drafted blocks, position weights, the TLI
    # intersection); its defaults are the shipped recipe (original masking + KL).
    c.loss = ml_collections.ConfigDict(dataclasses.asdict(loss_lib.LossConfig()))

    # The original trainer's settings (DESIGN.md "Training system").
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2.5e-5
    c.optim.final_lr_fraction = 0.0
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.max_grad_norm = 1.0
    c.optim.grad_accum_steps = 1

    c.train = ml_collections.ConfigDict()
    c.train.seed = 0
    c.train.num_epochs = 3
    c.train.num_steps = 0              # 0: derived from num_epochs and the dataset size
    c.train.log_every = 10
    c.train.eval_every = 200           # 0: no periodic eval
    c.train.eval_batches = 8
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 2
    c.train.async_checkpointing = True

    # Drafter metrics (distill/metrics.evaluate_model), the same in `train`'s periodic eval, the
    # demo and `llada-jax eval`.
    c.eval = ml_collections.ConfigDict()
    c.eval.gammas = (4, 8)
    c.eval.seed = 0                    # seed of the drafting cut points
    c.eval.chunk_size = 256            # scored positions per LM-head chunk

    # On-policy rounds (`llada-jax onpolicy`, llada_jax/onpolicy/rounds.py): train.num_steps -
    # rounds x steps_per_round offline steps on data.dir, then each round decodes
    # prompts_per_round training prompts with the latest drafter (speculate, TLI), writes their
    # blocks as records and trains steps_per_round steps on data.dir mixed with every round so
    # far (`weight`: the rounds' share, split evenly). 0 rounds: plain training.
    c.onpolicy = ml_collections.ConfigDict()
    c.onpolicy.rounds = 0
    c.onpolicy.steps_per_round = 100
    c.onpolicy.prompts_per_round = 128  # round r takes the next ones, wrapping around
    c.onpolicy.weight = 0.5
    c.onpolicy.teacher = ""            # causal teacher: params checkpoint or HF dir (required)
    c.onpolicy.teacher_tokenizer = ""  # "": data.dir's teacher tokenizer
    c.onpolicy.prompts = ""            # prompts file; "": the prompts of data.dir's train split
    c.onpolicy.gamma = 4
    c.onpolicy.trailing_masks = 4
    c.onpolicy.denoising_steps = 1
    c.onpolicy.greedy = False          # False: the teacher and the drafter sample at temperature
    c.onpolicy.temperature = 1.0
    c.onpolicy.max_new_tokens = 32
    c.onpolicy.seed = 0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                   # -1: every device not used by fsdp/tensor
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # Logical axis -> mesh axes, for params and activations; the "batch" rule also shards the
    # rows of every input batch.
    c.mesh.rules = sharding.DEFAULT_RULES
    return c


def random_init_model_config(config: ml_collections.ConfigDict, vocab_size: int,
                             mask_token_id: int, eos_token_id: int | None = None) -> ModelConfig:
    """The student ModelConfig that `config.model` describes, for a random init (or a compile)."""
    m = config.model
    return ModelConfig(
        d_model=m.d_model, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, n_layers=m.n_layers,
        mlp_hidden_size=m.mlp_hidden_size, vocab_size=vocab_size, rope_theta=m.rope_theta,
        mask_token_id=mask_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
        max_sequence_length=config.data.seq_len, **run_settings(config))


def run_settings(config: ml_collections.ConfigDict) -> dict:
    """The ModelConfig run fields (not architecture) that a training config sets."""
    return {k: config.model[k] for k in RUN_FIELDS}


def shipped_configs() -> list[str]:
    """The shipped config names, each variant spelled out (`llada_8b:v5e_64`)."""
    names = []
    for entry in sorted(importlib.resources.files(SHIPPED).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".py") and not entry.name.startswith("_"):
            module = importlib.import_module(f"{SHIPPED}.{entry.name[:-3]}")
            variants = getattr(module, "VARIANTS", None)
            names += ([f"{entry.name[:-3]}:{v}" for v in variants] if variants
                      else [entry.name[:-3]])
    return names


def _config_module(name: str):
    """A shipped config by name, or a file path (anything with a '/' or ending in .py)."""
    if name.endswith(".py") or "/" in name:
        path = pathlib.Path(name)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass a file or a shipped "
                              f"config: {', '.join(shipped_configs())}")
        module_spec = importlib.util.spec_from_file_location(f"_llada_config_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except SyntaxError as err:
            raise ConfigError(f"config file {path}, line {err.lineno}: {err.msg}: "
                              f"{(err.text or '').strip()!r}") from None
        return module
    if not name.isidentifier() or importlib.util.find_spec(f"{SHIPPED}.{name}") is None:
        raise ConfigError(f"--config {name}: no shipped config of that name; use one of "
                          f"{', '.join(shipped_configs())} or a config file path")
    return importlib.import_module(f"{SHIPPED}.{name}")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`tiny`, `llada_8b:v5e_64`, `path/to/file.py` or `path/to/file.py:variant` -> ConfigDict."""
    name, _, variant = spec.partition(":")
    module = _config_module(name)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config {name} defines no get_config()")
    config = module.get_config(variant) if variant else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"config {name}: get_config() returned a {type(config).__name__}; it "
                          f"must return a ConfigDict (start from default_config())")
    if problems := field_problems(config, default_config()):
        raise ConfigError(f"config {name} does not match the config schema (a typo is silently "
                          f"a new field):\n  " + "\n  ".join(problems))
    return config


def field_problems(config, schema, prefix: str = "") -> list[str]:
    """Fields of `config` that `schema` lacks (typos: `c.optim.lrr`), and sections it misses."""
    problems = []
    for key in config.keys():
        name = prefix + key
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema.keys()), n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            problems.append(f"unknown config field {name!r}{hint} (known here: "
                            f"{sorted(schema.keys())})")
        elif isinstance(schema[key], ml_collections.ConfigDict):
            if not isinstance(config[key], ml_collections.ConfigDict):
                problems.append(f"{name} must be a section (ConfigDict), not {config[key]!r}")
            else:
                problems += field_problems(config[key], schema[key], name + ".")
    problems += [f"config section {prefix + key!r} is missing (start from default_config())"
                 for key in schema.keys() if key not in config
                 and isinstance(schema[key], ml_collections.ConfigDict)]
    return problems


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as a path


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Apply `--config.a.b=v` (or `--config.a.b v`) overrides; types must match the field's."""
    pending = list(overrides)
    while pending:
        item = pending.pop(0)
        if not item.startswith("--config."):
            raise ConfigError(f"unrecognised argument {item!r}: overrides look like --config.optim.lr=1e-5")
        key, sep, raw = item[len("--config."):].partition("=")
        if not sep:
            if not pending:
                raise ConfigError(f"override --config.{key} has no value")
            raw = pending.pop(0)
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            if name not in node:
                raise ConfigError(f"unknown config field {key!r} (no section {name!r})")
            node = node[name]
        if leaf not in node:
            raise ConfigError(f"unknown config field {key!r}; known: {sorted(node.keys())}")
        value = _parse_value(raw)
        current = node[leaf]
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if current is not None and isinstance(value, str) and not isinstance(current, str):
            raise ConfigError(f"--config.{key}={raw}: expected a {type(current).__name__}")
        try:
            node[leaf] = value
        except TypeError as err:
            raise ConfigError(f"--config.{key}={raw}: {err}") from None
    return config


def load_config(spec: str, overrides: list[str] = (), *,
                num_devices: int | None = None) -> ml_collections.ConfigDict:
    """The config `spec` names with `overrides` applied, validated (see `validate`)."""
    config = apply_overrides(load_config_file(spec), list(overrides))
    validate(config, num_devices=num_devices)
    return config


def _choice_fields() -> dict[str, tuple]:
    fields = {f"model.{k}": v for k, v in run_setting_choices().items()}
    fields.update({"model.scan_layers": (True, False), "data.pack": (True, False),
                   "train.async_checkpointing": (True, False),
                   "onpolicy.greedy": (True, False)})
    return fields


# field -> (test, what it must be); fields are "section.name".
_RANGES = {
    "model.d_model": (lambda v: v > 0, "> 0"), "model.n_heads": (lambda v: v > 0, "> 0"),
    "model.n_kv_heads": (lambda v: v > 0, "> 0"), "model.n_layers": (lambda v: v > 0, "> 0"),
    "model.mlp_hidden_size": (lambda v: v > 0, "> 0"),
    "model.rope_theta": (lambda v: v > 0, "> 0"),
    "data.seq_len": (lambda v: v > 0, "> 0"), "data.global_batch_size": (lambda v: v > 0, "> 0"),
    "data.num_shards": (lambda v: v >= 0, ">= 0 (0: one per process)"),
    "data.eval_split": (lambda v: bool(v), "a split name, e.g. 'validation'"),
    "optim.lr": (lambda v: v > 0, "> 0"),
    "optim.final_lr_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "optim.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "optim.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optim.b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.eps": (lambda v: v > 0, "> 0"), "optim.max_grad_norm": (lambda v: v > 0, "> 0"),
    "optim.grad_accum_steps": (lambda v: v >= 1, ">= 1"),
    "train.num_epochs": (lambda v: v >= 1, ">= 1"),
    "train.num_steps": (lambda v: v >= 0, ">= 0 (0: from num_epochs)"),
    "train.log_every": (lambda v: v >= 1, ">= 1"), "train.eval_every": (lambda v: v >= 0, ">= 0"),
    "train.eval_batches": (lambda v: v >= 1, ">= 1"),
    "train.checkpoint_every": (lambda v: v >= 1, ">= 1"),
    "train.keep_checkpoints": (lambda v: v >= 1, ">= 1"),
    "onpolicy.rounds": (lambda v: v >= 0, ">= 0"),
    "onpolicy.steps_per_round": (lambda v: v >= 1, ">= 1"),
    "onpolicy.prompts_per_round": (lambda v: v >= 1, ">= 1"),
    "onpolicy.weight": (lambda v: 0 < v < 1, "in (0, 1): the on-policy share of the mix"),
    "onpolicy.gamma": (lambda v: v >= 1, ">= 1"),
    "onpolicy.trailing_masks": (lambda v: v >= 0, ">= 0"),
    "onpolicy.denoising_steps": (lambda v: v >= 1, ">= 1"),
    "onpolicy.temperature": (lambda v: v > 0, "> 0"),
    "onpolicy.max_new_tokens": (lambda v: v >= 2, ">= 2"),
    "eval.gammas": (lambda v: len(v) > 0 and all(isinstance(g, int) and g > 0 for g in v),
                    "a tuple of positive ints, e.g. (4, 8)"),
}


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             num_processes: int = 1, for_training: bool = False) -> None:
    """Raises one ConfigError listing every field that is wrong, and what it may be.

    Checks every choice field and numeric range, the mesh rules, the paths that are set
    (data.dir a `preprocess` output, model.init a params checkpoint); with `num_devices` the
    mesh against the devices and the global batch against the mesh's batch axes and the data
    shards of `num_processes`; with
    `for_training` that data.dir and model.init are set.
    """
    get = lambda field: config[field.split(".")[0]][field.split(".")[1]]
    problems = [f"{field}={get(field)!r} is not one of {allowed}"
                for field, allowed in _choice_fields().items() if get(field) not in allowed]
    problems += [f"{field}={get(field)!r} must be {want}" for field, (ok, want) in _RANGES.items()
                 if not ok(get(field))]
    problems += loss_lib.LossConfig.check(config.loss)[1]
    problems += _path_problems(config, for_training)
    problems += _mesh_problems(config, num_devices, num_processes)
    if problems:
        raise ConfigError("invalid config (fix these with --config.FIELD=VALUE or in the config "
                          "file):\n  " + "\n  ".join(problems))


def _path_problems(config: ml_collections.ConfigDict, for_training: bool) -> list[str]:
    problems = []
    data_dir, init = config.data.dir, config.model.init
    if data_dir and not os.path.isfile(os.path.join(records.dataset_dir(data_dir),
                                                    "dataset_info.json")):
        problems.append(f"data.dir={data_dir!r} is not a `llada-jax preprocess` output "
                        f"(no dataset_info.json under it)")
    if init and init != "random":
        kind = checkpoints.checkpoint_kind(init)
        if kind != "params":
            problems.append(f"model.init={init!r} is {checkpoints.describe_kind(kind)}; it must "
                            f"be a params checkpoint (`llada-jax import-hf --out DIR`) or "
                            f"\"random\"")
    problems += _mix_problems(config)
    if for_training and not data_dir:
        problems.append("data.dir is empty: pass --config.data.dir=DATA_DIR (a `llada-jax "
                        "preprocess` output)")
    if for_training and not init:
        problems.append("model.init is empty: pass --config.model.init=CKPT (a params checkpoint "
                        "from `llada-jax import-hf`), or \"random\"")
    return problems


# Metadata every dataset of a mix must share with data.dir: the same tokens and targets.
_MIX_SAME = ("student_tokenizer", "teacher_tokenizer", "record_format")


def _mix_problems(config: ml_collections.ConfigDict) -> list[str]:
    mix = config.data.mix
    if not mix:
        return []
    if not all(isinstance(e, (tuple, list)) and len(e) == 2 and isinstance(e[0], str)
               and isinstance(e[1], (int, float)) for e in mix):
        return [f"data.mix={mix!r} must be ((dataset dir, weight), ...) pairs"]
    problems = [f"data.mix weight {w!r} of {d} must be a finite number > 0"
                for d, w in mix if not 0 < w < math.inf]
    problems += [f"data.mix dataset {d!r} is not a `llada-jax preprocess` output (no "
                 f"dataset_info.json under it)" for d, _ in mix
                 if not os.path.isfile(os.path.join(records.dataset_dir(d), "dataset_info.json"))]
    if config.train.num_steps <= 0:
        problems.append("data.mix repeats its datasets forever, so epochs mean nothing: set "
                        "train.num_steps > 0")
    if problems or not config.data.dir or not os.path.isfile(
            os.path.join(records.dataset_dir(config.data.dir), "dataset_info.json")):
        return problems
    want = data_loader.read_metadata(config.data.dir).options
    for path, _ in mix:
        have = data_loader.read_metadata(path).options
        problems += [f"data.mix dataset {path} has {key}={have.get(key)!r} but data.dir="
                     f"{config.data.dir} has {want.get(key)!r}: mix only datasets of the same "
                     f"tokenizers and record format" for key in _MIX_SAME
                     if _fingerprint(have.get(key)) != _fingerprint(want.get(key))]
    return problems


def _fingerprint(value):
    """A tokenizer path's tokenizer.json bytes (one tokenizer saved in two places is the same
    tokenizer); any other value as it is."""
    if isinstance(value, str):
        path = pathlib.Path(value)
        path = path / "tokenizer.json" if path.is_dir() else path
        if path.is_file():
            return path.read_bytes()
    return value


def _mesh_problems(config: ml_collections.ConfigDict, num_devices: int | None,
                   num_processes: int) -> list[str]:
    rules = config.mesh.rules
    axes_ok = lambda a: a is None or a in sharding.MESH_AXES or (
        isinstance(a, (tuple, list)) and all(x in sharding.MESH_AXES for x in a))
    if not all(isinstance(r, (tuple, list)) and len(r) == 2 and axes_ok(r[1]) for r in rules):
        return [f"mesh.rules={rules!r} must be (logical name, mesh axis | tuple of mesh axes | "
                f"None) pairs over the mesh axes {sharding.MESH_AXES}"]
    if num_devices is None:
        return []
    try:
        sizes = sharding.mesh_sizes({k: config.mesh[k] for k in sharding.MESH_AXES}, num_devices)
    except sharding.ShardingError as err:
        return [f"mesh.data/fsdp/tensor: {err}"]
    batch_axes = dict(rules).get("batch") or ()
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    rows = math.prod(sizes[a] for a in batch_axes) * config.optim.grad_accum_steps
    gbs = config.data.global_batch_size
    problems = []
    if gbs % rows:
        problems.append(f"data.global_batch_size={gbs} must be a multiple of "
                        f"optim.grad_accum_steps={config.optim.grad_accum_steps} x the "
                        f"{math.prod(sizes[a] for a in batch_axes)} devices of the batch axes "
                        f"{batch_axes} (mesh {sizes})")
    if problem := data_loader.shard_problem(gbs, config.data.num_shards, num_processes):
        problems.append(problem)
    return problems
