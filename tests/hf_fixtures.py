"""Tiny random HF LLaDA directories (config.json + safetensors), written with torch, for tests."""

from __future__ import annotations

import json
import pathlib

import torch
from safetensors.torch import save_file

PREFIX = "model.transformer."


def hf_config(**changes) -> dict:
    """A tiny LLaDA config.json dict with the fields the real LLaDA-8B config has."""
    cfg = {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0,
        "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModel": "modeling_llada.LLaDAModelLM",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
        "d_model": 48, "embedding_dropout": 0.0, "embedding_size": 64, "eos_token_id": 60,
        "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
        "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02,
        "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
        "mask_token_id": 58, "max_sequence_length": 64, "mlp_hidden_size": 40, "mlp_ratio": 4,
        "model_type": "llada", "multi_query_attention": None, "n_heads": 3, "n_kv_heads": 3,
        "n_layers": 2, "pad_token_id": 60, "precision": "amp_bf16", "residual_dropout": 0.0,
        "rms_norm_eps": 1e-5, "rope": True, "rope_full_precision": True, "rope_theta": 10000.0,
        "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False,
        "vocab_size": 61, "weight_tying": False,
    }
    cfg.update(changes)
    return cfg


def random_state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 HF state dict with O(1) activations and logits."""
    gen = torch.Generator().manual_seed(seed)
    d, f, v = cfg["d_model"], cfg["mlp_hidden_size"], cfg["embedding_size"]
    hd = d // cfg["n_heads"]
    kv = (cfg["n_kv_heads"] or cfg["n_heads"]) * hd
    linear = lambda out, inp: torch.randn(out, inp, generator=gen) / inp ** 0.5
    norm = lambda: 1.0 + 0.1 * torch.randn(d, generator=gen)
    state = {PREFIX + "wte.weight": linear(v, d)}  # also the LM head when tied: O(1) logits
    for i in range(cfg["n_layers"]):
        b = f"{PREFIX}blocks.{i}."
        state.update({
            b + "attn_norm.weight": norm(), b + "q_proj.weight": linear(d, d),
            b + "k_proj.weight": linear(kv, d), b + "v_proj.weight": linear(kv, d),
            b + "attn_out.weight": linear(d, d), b + "ff_norm.weight": norm(),
            b + "ff_proj.weight": linear(f, d), b + "up_proj.weight": linear(f, d),
            b + "ff_out.weight": linear(d, f)})
    state[PREFIX + "ln_f.weight"] = norm()
    if not cfg["weight_tying"]:
        state[PREFIX + "ff_out.weight"] = linear(v, d)
    return state


def write_hf_dir(path: pathlib.Path, cfg: dict, state: dict[str, torch.Tensor],
                 shards: int = 3) -> pathlib.Path:
    """config.json + `shards` safetensors files (+ index when shards > 1), HF naming."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    names = list(state)
    if shards == 1:
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
        return path
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n].contiguous() for n in names[s::shards]}
        save_file(part, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return path
