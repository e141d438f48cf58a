"""The training config: one schema with the original system's defaults, loading and overrides.

Config files in `configs/` start from `default_config()` and change what differs (`tiny.py`
shrinks it for CPU, `llada_8b.py` sizes it for a TPU slice), so every file has the same fields
and `--config.a.b=v` overrides work on all of them.

A config file exposes `get_config(arg: str | None)`; a file may be named as `configs/llada_8b.py:v5e_64` to pass `arg` (a named variant), like ml_collections'
`config_flags`.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib

import ml_collections

from llada_jax.model.config import ModelConfig


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
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"         # compute dtype
    c.model.scan_layers = True
    c.model.remat_policy = "full"      # none | full | dots
    c.model.attention_impl = "xla"     # xla | dot_product_attention | splash

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""                    # a `llada-jax preprocess` output dir (required)
    c.data.seq_len = 4096
    c.data.global_batch_size = 2
    c.data.seed = 0
    c.data.pack = True
    c.data.num_shards = 0              # data shards (0: one per process); keep it to resume
    c.data.eval_split = "validation"

    c.loss = ml_collections.ConfigDict()
    c.loss.kind = "kl"                 # divergences.KINDS: kl | reverse_kl | jsd | tvd | alpha | lk
    c.loss.temperature = 1.0
    c.loss.beta = 0.5                  # jsd only: beta KL(p || m) + (1 - beta) KL(q || m)
    # How the LM head is cut (llada_jax/train/chunked_head.py): "sequence" chunks of chunk_size positions
    # (fewest FLOPs: logits made once, gradients in closed form; holds [B, chunk, V] logits),
    # or "vocab" tiles of vocab_tile columns (a few [B, L, tile] buffers; one head-gradient
    # reduction across devices). vocab_tile also cuts the sequence path's head-gradient adds.
    c.loss.chunk_axis = "sequence"
    c.loss.chunk_size = 256
    c.loss.vocab_tile = 4096
    c.loss.mask_mode = "original"      # masking.MODES: original | masked_only | full | prefix_block | draft_blocks
    c.loss.mask_eps = 1e-3
    # -- acceptance training (issue 16): allowed values next to the code that implements them --
    c.loss.lk_decay = 1.0              # lk: w = exp(-lk_decay alpha) (divergences.divergence)
    c.loss.position_weights = "uniform"  # loss.POSITION_WEIGHTS: uniform | streak | geometric
    c.loss.geometric_ratio = 0.7       # geometric: offset j weighs ratio^j
    c.loss.streak_ema = 0.9            # streak: EMA decay of the per-offset acceptance
    c.loss.draft_gamma = 4             # draft_blocks: masked, scored block length
    c.loss.draft_gamma_max = 0         # > draft_gamma: gamma ~ U{draft_gamma..draft_gamma_max}
    c.loss.draft_trailing = 4          # draft_blocks: trailing masks (speculate --trailing-masks)
    c.loss.intersection_vocab = False  # student restricted to the TLI intersection (loss.intersection_bias)
    # -- end acceptance training --

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

    # Drafter metrics (llada_jax/eval/evaluate.py), the same in `train`'s periodic eval, the
    # demo and `llada-jax eval`.
    c.eval = ml_collections.ConfigDict()
    c.eval.gammas = (4, 8)
    c.eval.seed = 0                    # seed of the drafting cut points
    c.eval.chunk_size = 256            # scored positions per LM-head chunk

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                   # -1: every device not used by fsdp/tensor
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
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
    m = config.model
    return dict(scan_layers=m.scan_layers, remat_policy=m.remat_policy, param_dtype=m.param_dtype,
                dtype=m.dtype, attention_impl=m.attention_impl)

class ConfigError(ValueError):
    """A config file or override the user must fix."""


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path/to/file.py` or `path/to/file.py:variant` -> ConfigDict."""
    path_str, _, variant = spec.partition(":")
    path = pathlib.Path(path_str)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (pass e.g. --config configs/tiny.py)")
    module_spec = importlib.util.spec_from_file_location(f"_llada_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config()")
    return module.get_config(variant or None) if variant else module.get_config()


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


def load_config(spec: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    return apply_overrides(load_config_file(spec), list(overrides))
