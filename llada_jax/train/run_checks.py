"""Checks a training run makes before any heavy work: does the workdir's model match the one this
run would build (resume), and does the model fit in memory at all (random init)."""

from __future__ import annotations

import os
import pathlib

from llada_jax import checkpoints
from llada_jax.errors import ConfigError
from llada_jax.model.config import ModelConfig

# ModelConfig fields that fix the params' tree and shapes: a checkpoint restores only into these.
SHAPE_FIELDS = ("model_type", "d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size",
                "vocab_size", "embedding_size", "weight_tying", "scan_layers")
# Where each field comes from in a training config (the rest come from the data or the init).
_CONFIG_FIELD = {f: f"model.{f}" for f in ("d_model", "n_heads", "n_kv_heads", "n_layers",
                                            "mlp_hidden_size", "scan_layers")}
# Bytes a param costs while training: the param, its gradient, Adam's two float32 moments.
_OPTIMIZER_BYTES = 8


def check_resume_shape(workdir: str | pathlib.Path, cfg: ModelConfig, init: str) -> None:
    """Raises ConfigError naming every shape field where `cfg` differs from the model the
    workdir's checkpoints hold (its config.json); nothing when the workdir has no checkpoint."""
    workdir = pathlib.Path(workdir)
    if not (workdir / checkpoints.STEPS_DIR).is_dir() or not checkpoints.workdir_steps(workdir):
        return
    stored = checkpoints.load_config(workdir)
    diffs = [(f, getattr(stored, f), getattr(cfg, f)) for f in SHAPE_FIELDS
             if getattr(stored, f) != getattr(cfg, f)]
    if not diffs:
        return
    source = (lambda f: f"--config.{_CONFIG_FIELD[f]}={{new}}" if init == "random"
              and f in _CONFIG_FIELD else f"this run's {f}={{new}} (from model.init={init} or "
              "the data's student tokenizer)")
    lines = [f"this workdir was trained with {f}={old}; " + source(f).format(new=new) + " differs"
             for f, old, new in diffs]
    raise ConfigError(f"cannot resume {workdir}: its checkpoints hold another model shape:\n  "
                      + "\n  ".join(lines) + "\nresume with the same model settings, or pick a "
                      "new --workdir for a new model")


def param_count(cfg: ModelConfig) -> int:
    """Parameters of the LLaDA/LLaMA block stack, embedding and head (norms included)."""
    d, kv_dim = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
    per_layer = 2 * d * d + 2 * d * kv_dim + 3 * d * cfg.mlp_hidden_size + 2 * d
    heads = 1 if cfg.weight_tying else 2
    return cfg.n_layers * per_layer + heads * cfg.embedding_size * d + d


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory_bytes(devices) -> int | None:
    """Total memory of `devices` (accelerators report it; on CPU the host's RAM), or None."""
    if all(d.platform == "cpu" for d in devices):
        return host_memory_bytes()
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
    return None if None in limits else sum(limits)


def check_fits(cfg: ModelConfig, devices, *, what: str) -> None:
    """Refuses a model whose params, gradients and optimizer state exceed the devices' memory
    (even perfectly sharded), before a random init tries to allocate them."""
    available = device_memory_bytes(devices)
    if available is None:
        return
    from llada_jax.model.config import DTYPES

    n = param_count(cfg)
    need = n * (2 * DTYPES[cfg.param_dtype].itemsize + _OPTIMIZER_BYTES)
    if need > available:
        raise ConfigError(
            f"{what}: a {n / 1e9:.2f}B-parameter model (d_model={cfg.d_model}, n_layers="
            f"{cfg.n_layers}, vocab_size={cfg.vocab_size}) needs about {need / 2**30:.1f} GiB for "
            f"params, gradients and Adam state, but the {len(devices)} {devices[0].platform} "
            f"device(s) have {available / 2**30:.1f} GiB: use a smaller model (--config tiny, or "
            f"--config.model.d_model / n_layers / mlp_hidden_size) or more devices")
