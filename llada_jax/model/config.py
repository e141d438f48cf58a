"""Model configuration: the LLaDA architecture fields of an HF `config.json`, plus how we run it.

An HF LLaMA config.json (`model_type: "llama"`, e.g. a LLaMA-3 teacher) is read and written by
llama_config.py into the same dataclass (`model_type="llama"`, causal); the rest of this
docstring is about LLaDA's.

`ModelConfig.from_hf_config(json.load(open("config.json")))` reads an HF LLaDA config
(`configuration_llada.py` fields; a missing field takes that file's default, as the HF code does)
and refuses values this implementation does not compute (non-"llama" blocks, ALiBi, biases, ...)
with an error naming the field. `to_hf_config()` gives back a dict that the original HF code loads:
every key of the source config.json is kept verbatim (`hf_extra`), the architecture fields are
written from the dataclass, and our own run settings (causal, scan_layers, remat_policy,
param_dtype, dtype, attention_impl) go under one namespaced key, `"llada_jax"`, which the HF code
ignores and `from_hf_config` reads back.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_dtypes
import numpy as np

from llada_jax.errors import ConfigError
from llada_jax.model import llama_config
from llada_jax.model.rope import RopeScaling

# Param and compute dtypes by config name (the remat and attention choices are the keys of
# modeling.REMAT_POLICIES and attention.ATTENTION_IMPLS).
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
OWN_KEY = "llada_jax"
# Our ModelConfig fields that are not HF fields (kept under OWN_KEY in config.json).
RUN_SETTINGS = ("causal", "scan_layers", "remat_policy", "param_dtype", "dtype", "attention_impl")

# Defaults of configuration_llada.ModelConfig for the fields we read, used when a key is absent.
_HF_DEFAULTS: dict[str, Any] = {
    "d_model": 768, "n_heads": 12, "n_kv_heads": None, "n_layers": 12, "mlp_ratio": 4,
    "mlp_hidden_size": None, "activation_type": "swiglu", "block_type": "sequential",
    "block_group_size": 1, "alibi": False, "rope": False, "attention_layer_norm": False,
    "input_emb_norm": False, "layer_norm_type": "default", "layer_norm_with_affine": True,
    "rms_norm_eps": 1e-5, "max_sequence_length": 1024, "rope_theta": 10000.0,
    "include_qkv_bias": False, "include_bias": False, "bias_for_layer_norm": None,
    "scale_logits": False, "vocab_size": 50257, "embedding_size": 50304, "weight_tying": True,
    "eos_token_id": 50256, "pad_token_id": 50256, "mask_token_id": 50256,
    "multi_query_attention": None,
}

# field -> (value it must have, or a predicate; what the value means for this implementation)
_REQUIRED_VALUES: dict[str, tuple[Any, str]] = {
    "block_type": ("llama", "only the LLaMA-style block (separate q/k/v, SwiGLU MLP) is implemented"),
    "activation_type": ("silu", "the LLaMA block's gate activation must be silu"),
    "alibi": (False, "ALiBi position biases are not implemented (LLaDA uses RoPE)"),
    "rope": (True, "RoPE must be on (learned position embeddings are not implemented)"),
    "include_bias": (False, "linear-layer biases are not implemented"),
    "include_qkv_bias": (False, "q/k/v biases are not implemented"),
    "bias_for_layer_norm": (False, "layer-norm biases are not implemented"),
    "layer_norm_type": ("rms", "only RMSNorm is implemented"),
    "layer_norm_with_affine": (True, "norms must have a weight"),
    "attention_layer_norm": (False, "q/k layer norms are not implemented"),
    "input_emb_norm": (False, "embedding scaling by sqrt(d_model) is not implemented"),
    "scale_logits": (False, "logit scaling is not implemented"),
    "block_group_size": (1, "grouped blocks (transformer.block_groups.*) are not implemented"),
}

# Written by to_hf_config for a config that did not come from an HF file (random init).
_HF_TEMPLATE: dict[str, Any] = {
    "architectures": ["LLaDAModelLM"],
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModel": "modeling_llada.LLaDAModelLM",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    "model_type": "llada", "activation_type": "silu", "block_type": "llama", "block_group_size": 1,
    "alibi": False, "rope": True, "rope_full_precision": True, "include_bias": False,
    "include_qkv_bias": False, "bias_for_layer_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "attention_layer_norm": False, "input_emb_norm": False,
    "scale_logits": False, "multi_query_attention": None, "attention_dropout": 0.0,
    "residual_dropout": 0.0, "embedding_dropout": 0.0, "flash_attention": False,
    "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "use_cache": False,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """LLaDA architecture (HF field names) and run settings. Frozen and hashable (jit-static).

    V = embedding_size is the width of the embedding table and of the logits (the HF model's too);
    token ids stay below vocab_size <= embedding_size.
    """

    d_model: int
    n_heads: int
    n_layers: int
    mlp_hidden_size: int
    vocab_size: int
    n_kv_heads: int | None = None          # None -> n_heads
    embedding_size: int | None = None      # None -> vocab_size
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    mask_token_id: int | None = 126336      # None: a causal LM without one (LLaMA)
    eos_token_id: int | tuple[int, ...] | None = 126081   # LLaMA-3 instruct lists several
    pad_token_id: int | None = 126081
    weight_tying: bool = False
    rope_scaling: RopeScaling | None = None  # None = plain RoPE (LLaDA); see rope.py
    model_type: str = "llada"                # HF format: "llada" or "llama" (key names, config)
    # Our run settings (not HF fields).
    causal: bool = False                   # True: LLaMA-style causal attention (e.g. a teacher)
    scan_layers: bool = True               # False: a Python loop over the same stacked params
    remat_policy: str = "none"             # a key of modeling.REMAT_POLICIES
    param_dtype: str = "float32"
    dtype: str = "bfloat16"                # compute dtype
    attention_impl: str = "xla"            # a key of attention.ATTENTION_IMPLS
    # The source config.json, verbatim, as sorted (key, json-encoded value) pairs (hashable).
    hf_extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.embedding_size is None:
            object.__setattr__(self, "embedding_size", self.vocab_size)
        self._validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def _validate(self) -> None:
        problems = []
        if self.d_model % self.n_heads:
            problems.append(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        elif self.head_dim % 2:
            problems.append(f"head_dim=d_model/n_heads={self.head_dim} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.embedding_size < self.vocab_size:
            problems.append(f"embedding_size={self.embedding_size} < vocab_size={self.vocab_size}")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.embedding_size:
            problems.append(f"mask_token_id={self.mask_token_id} is outside the embedding table "
                            f"(embedding_size={self.embedding_size})")
        if self.model_type not in ("llada", "llama"):
            problems.append(f"model_type={self.model_type!r} is not 'llada' or 'llama'")
        elif self.model_type == "llada" and (self.rope_scaling or RopeScaling()).rope_type != "default":
            problems.append("RoPE scaling is only read and written for LLaMA configs")
        for name, allowed in run_setting_choices().items():
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides) -> ModelConfig:
        """HF LLaDA or LLaMA config.json dict -> ModelConfig; `overrides` set run settings."""
        if hf.get("model_type", "llada") not in ("llada", "llama"):
            raise ConfigError(f"config.json has model_type={hf['model_type']!r}; expected 'llada' "
                              f"or 'llama' (LlamaForCausalLM)")
        own = dict(hf.get(OWN_KEY) or {})
        own.update(overrides)
        unknown = own.keys() - set(RUN_SETTINGS)
        if unknown:
            raise ConfigError(f"unknown run settings {sorted(unknown)}; they are {RUN_SETTINGS}")
        hf_extra = tuple(sorted((k, json.dumps(v)) for k, v in hf.items() if k != OWN_KEY))
        if hf.get("model_type") == "llama":
            fields, problems = llama_config.fields_from_hf(hf)
            if problems:
                raise ConfigError("unsupported LLaMA config.json: " + "; ".join(problems))
            return cls(**(fields | own), hf_extra=hf_extra)
        get = lambda key: hf.get(key, _HF_DEFAULTS[key])
        problems = [f"{field}={get(field)!r}: {why} (need {want!r})"
                    for field, (want, why) in _REQUIRED_VALUES.items()
                    if _normalise(field, get(field)) != want]
        if problems:
            raise ConfigError("unsupported LLaDA config.json: " + "; ".join(problems))
        mlp_hidden = get("mlp_hidden_size") or get("mlp_ratio") * get("d_model")
        return cls(
            d_model=get("d_model"), n_heads=get("n_heads"), n_layers=get("n_layers"),
            n_kv_heads=_kv_heads(get("n_heads"), get("n_kv_heads"), get("multi_query_attention")),
            mlp_hidden_size=mlp_hidden, vocab_size=get("vocab_size"),
            embedding_size=get("embedding_size"), rope_theta=float(get("rope_theta")),
            rms_norm_eps=float(get("rms_norm_eps")), max_sequence_length=get("max_sequence_length"),
            mask_token_id=get("mask_token_id"), eos_token_id=get("eos_token_id"),
            pad_token_id=get("pad_token_id"), weight_tying=bool(get("weight_tying")),
            hf_extra=hf_extra, **own)

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json dict the original HF LLaDA code (or LlamaForCausalLM) loads."""
        source = {k: json.loads(v) for k, v in self.hf_extra}
        if self.model_type == "llama":
            return llama_config.to_hf(self, source) | {OWN_KEY: self._run_settings()}
        hf = dict(_HF_TEMPLATE) if not self.hf_extra else {}
        hf.update(source)
        hf.update({
            "d_model": self.d_model, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "n_layers": self.n_layers, "mlp_hidden_size": self.mlp_hidden_size,
            "vocab_size": self.vocab_size, "embedding_size": self.embedding_size,
            "rope_theta": self.rope_theta, "rms_norm_eps": self.rms_norm_eps,
            "max_sequence_length": self.max_sequence_length, "mask_token_id": self.mask_token_id,
            "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
            "weight_tying": self.weight_tying,
        })
        if hf.get("multi_query_attention") is not None:  # n_kv_heads now says it all
            hf["multi_query_attention"] = None
        hf[OWN_KEY] = self._run_settings()
        return hf

    def _run_settings(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in RUN_SETTINGS}


# The names of modeling.REMAT_POLICIES and attention.ATTENTION_IMPLS (each of those modules
# checks at import that its table has exactly these keys).
REMAT_POLICY_NAMES = ("none", "full", "dots")
ATTENTION_IMPL_NAMES = ("xla", "dot_product_attention", "splash")


def run_setting_choices() -> dict[str, tuple[str, ...]]:
    """Allowed values of the run settings that are names (the training config checks them too)."""
    return {"remat_policy": REMAT_POLICY_NAMES, "attention_impl": ATTENTION_IMPL_NAMES,
            "param_dtype": tuple(DTYPES), "dtype": tuple(DTYPES)}


def run_setting_defaults() -> dict[str, Any]:
    """ModelConfig's defaults for RUN_SETTINGS: the training config's defaults too (one home)."""
    return {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in RUN_SETTINGS}


def _normalise(field: str, value: Any) -> Any:
    # HF reads None as "follow include_bias", i.e. no bias here.
    if field in ("include_qkv_bias", "bias_for_layer_norm") and value is None:
        return False
    return value


def _kv_heads(n_heads: int, n_kv_heads: int | None, multi_query: bool | None) -> int:
    """configuration_llada.ModelConfig.effective_n_kv_heads."""
    if n_kv_heads is None:
        return 1 if multi_query else n_heads
    expected = {None: n_kv_heads, True: 1, False: n_heads}[multi_query]
    if n_kv_heads != expected:
        raise ConfigError(f"n_kv_heads={n_kv_heads} contradicts multi_query_attention={multi_query}")
    return n_kv_heads
