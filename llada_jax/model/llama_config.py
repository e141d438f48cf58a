"""HF LLaMA config.json (LlamaForCausalLM, `model_type: "llama"`) <-> ModelConfig fields.

LLaMA runs as the same transformer as LLaDA, causally: the fields map one to one (hidden_size ->
d_model, num_key_value_heads -> n_kv_heads, tie_word_embeddings -> weight_tying, ...). RoPE is
read in both forms transformers has written: 4.x (`rope_scaling` dict + top-level
`rope_theta`) and 5.x (`rope_parameters` with `rope_theta` inside); export writes back the form
the source used (4.x for a config made here, which both versions read). Values this
implementation does not compute (biases, other activations, a head_dim other than
hidden_size / num_attention_heads, yarn/dynamic/longrope RoPE, ...) are problems naming the
field. Missing fields take LlamaConfig's defaults.
"""

from __future__ import annotations

from typing import Any

from llada_jax.model.rope import RopeScaling

# LlamaConfig (transformers 5.x) defaults for the fields read here.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": None,
    "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "pad_token_id": None, "eos_token_id": 2, "pretraining_tp": 1,
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "head_dim": None,
    "rope_theta": 10000.0,
}
_REQUIRED = {
    "hidden_act": ("silu", "the gate activation must be silu"),
    "attention_bias": (False, "q/k/v/o biases are not implemented"),
    "mlp_bias": (False, "MLP biases are not implemented"),
    "pretraining_tp": (1, "tensor-parallel-split linear layers (pretraining_tp > 1) are not "
                          "implemented"),
}
# What to_hf writes for a config not read from a file.
_TEMPLATE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
             "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
             "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True}


def fields_from_hf(hf: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(ModelConfig architecture kwargs, problems) for a LLaMA config.json dict."""
    get = lambda key: hf[key] if hf.get(key) is not None else _DEFAULTS[key]
    problems = [f"{field}={get(field)!r}: {why} (need {want!r})"
                for field, (want, why) in _REQUIRED.items() if get(field) != want]
    d, heads = get("hidden_size"), get("num_attention_heads")
    if hf.get("head_dim") is not None and heads and hf["head_dim"] != d // heads:
        problems.append(f"head_dim={hf['head_dim']}: only head_dim = hidden_size / "
                        f"num_attention_heads ({d // heads}) is implemented")
    where, rope = _rope_source(hf)
    theta = (rope or {}).get("rope_theta", get("rope_theta"))
    scaling, rope_problems = RopeScaling.from_hf(rope, get("max_position_embeddings"), where)
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        rope_problems.append(f"partial_rotary_factor={hf['partial_rotary_factor']}: only full "
                             f"rotary embeddings are implemented")
    eos = get("eos_token_id")
    fields = dict(
        model_type="llama", d_model=d, n_heads=heads, n_layers=get("num_hidden_layers"),
        n_kv_heads=get("num_key_value_heads") or heads, mlp_hidden_size=get("intermediate_size"),
        vocab_size=get("vocab_size"), rope_theta=float(theta), rms_norm_eps=float(get("rms_norm_eps")),
        max_sequence_length=get("max_position_embeddings"), mask_token_id=None,
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos, pad_token_id=get("pad_token_id"),
        weight_tying=bool(get("tie_word_embeddings")),
        rope_scaling=scaling, causal=True)
    return fields, problems + rope_problems


def _rope_source(hf: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """(field name, dict) of the RoPE settings: 5.x `rope_parameters` or 4.x `rope_scaling`."""
    if hf.get("rope_parameters"):
        return "rope_parameters", hf["rope_parameters"]
    return "rope_scaling", hf.get("rope_scaling")


def to_hf(cfg, source: dict[str, Any]) -> dict[str, Any]:
    """A LlamaForCausalLM config.json dict for `cfg`; `source` = the imported file's dict or {}."""
    hf = dict(source) if source else dict(_TEMPLATE)
    eos = cfg.eos_token_id
    hf.update({
        "hidden_size": cfg.d_model, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "num_hidden_layers": cfg.n_layers,
        "intermediate_size": cfg.mlp_hidden_size, "vocab_size": cfg.vocab_size,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_sequence_length, "tie_word_embeddings": cfg.weight_tying,
        "pad_token_id": cfg.pad_token_id,
        "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
    })
    scaling = (cfg.rope_scaling or RopeScaling()).to_hf()
    where, rope = _rope_source(hf)
    if where == "rope_parameters":  # 5.x form: theta inside, the source's other keys kept
        hf[where] = dict(rope) | (scaling or {"rope_type": "default"}) | {"rope_theta": cfg.rope_theta}
    else:
        hf["rope_theta"] = cfg.rope_theta
        hf[where] = None if scaling is None else dict(rope or {}) | scaling
    return hf


# The published config.json of Llama-3.3-70B-Instruct (transformers 4.x form): the shape the
# TPU decode plan compiles (bench/decode.py plan), read through fields_from_hf like any import.
LLAMA_3_3_70B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 8192, "initializer_range": 0.02,
    "intermediate_size": 28672, "max_position_embeddings": 131072, "mlp_bias": False,
    "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256,
}
