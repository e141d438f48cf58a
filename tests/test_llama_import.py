"""HF LLaMA (LlamaForCausalLM) import/export: logits vs transformers, RoPE scalings, round trip."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig

import llama_fixtures as lf
from llada_jax import cli
from llada_jax.model import params
from llada_jax.model.config import ConfigError, ModelConfig
from llada_jax.model.rope import RopeScaling, inv_freq

LENGTH = 40  # > original_max_position_embeddings (16) of the llama3 fixtures


@pytest.fixture(scope="module", params=sorted(lf.CONFIGS))
def llama_dir(request, tmp_path_factory):
    kwargs, form = lf.CONFIGS[request.param]
    return lf.write_llama_dir(tmp_path_factory.mktemp(request.param), lf.llama_config(**kwargs), form)


def _tokens(seed=0, batch=2):
    return np.random.default_rng(seed).integers(0, 97, (batch, LENGTH)).astype(np.int32)


def test_fp32_logits_match_transformers(llama_dir):
    cfg, model = params.load_hf(llama_dir, compute_dtype="float32")
    assert cfg.model_type == "llama" and cfg.causal
    tokens = _tokens()
    ref = lf.hf_logits(llama_dir, tokens)
    assert 1 < np.abs(ref).max() < 20, "logits should be O(1) for a meaningful tolerance"
    np.testing.assert_array_less(np.abs(np.asarray(model(jnp.asarray(tokens))) - ref).max(), 1e-5)
    # The scaling is really applied: plain RoPE differs already inside the original context.
    model.cfg = cfg.replace(rope_scaling=None)
    plain = np.asarray(model(jnp.asarray(tokens)))
    assert np.abs(plain[:, :16] - ref[:, :16]).max() > 1e-3


def test_bf16_within_bf16_rounding_of_transformers(llama_dir):
    tokens = _tokens(seed=1)
    exact = lf.hf_logits(llama_dir, tokens)
    hf_bf16 = np.abs(lf.hf_logits(llama_dir, tokens, dtype=torch.bfloat16) - exact).max()
    _, model = params.load_hf(llama_dir, dtype="bfloat16", compute_dtype="bfloat16")
    ours = np.abs(np.asarray(model(jnp.asarray(tokens))) - exact).max()
    # Both are bf16 computations of the same model: our error is of the size of transformers'.
    assert ours < max(2 * hf_bf16, 2 ** -7 * np.abs(exact).max()), (ours, hf_bf16)


def test_inv_freq_equals_transformers_for_every_supported_type():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for kwargs, _ in lf.CONFIGS.values():
        config = lf.llama_config(**kwargs)
        rope = dict(config.rope_parameters)
        want, scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config)
        scaling, problems = RopeScaling.from_hf(rope, config.max_position_embeddings)
        assert not problems and scale == 1.0
        np.testing.assert_allclose(inv_freq(config.head_dim, rope["rope_theta"], scaling),
                                   want.numpy(), rtol=1e-6)


def test_round_trip_is_bit_exact_and_loads_in_transformers(llama_dir, tmp_path):
    assert cli.main(["import-hf", "--hf-dir", str(llama_dir), "--out", str(tmp_path / "ck")]) == 0
    assert cli.main(["export-hf", "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "hf"),
                     "--source-hf-dir", str(llama_dir)]) == 0
    source = dict(params.iter_hf_tensors(llama_dir))
    exported = dict(params.iter_hf_tensors(tmp_path / "hf"))
    assert source.keys() == exported.keys()
    assert ("lm_head.weight" in source) != json.loads((llama_dir / "config.json").read_text()).get(
        "tie_word_embeddings", False)
    for name, value in source.items():
        assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name
    # The config keeps its source's RoPE form and means the same to transformers.
    src_cfg, out_cfg = (json.loads((d / "config.json").read_text()) for d in (llama_dir, tmp_path / "hf"))
    assert ("rope_scaling" in src_cfg) == ("rope_scaling" in out_cfg)
    a, b = LlamaConfig.from_pretrained(llama_dir), LlamaConfig.from_pretrained(tmp_path / "hf")
    for key in ("rope_parameters", "hidden_size", "num_key_value_heads", "tie_word_embeddings",
                "vocab_size", "eos_token_id", "rms_norm_eps", "max_position_embeddings"):
        assert getattr(a, key) == getattr(b, key), key
    tokens = _tokens(seed=2, batch=1)
    np.testing.assert_array_equal(lf.hf_logits(tmp_path / "hf", tokens), lf.hf_logits(llama_dir, tokens))


def test_imported_checkpoint_in_float32_matches_transformers(llama_dir, tmp_path):
    """import-hf --dtype float32 --compute-dtype float32, then load_model: fp32 logits."""
    from llada_jax.checkpoints import load_model

    assert cli.main(["import-hf", "--hf-dir", str(llama_dir), "--out", str(tmp_path / "ck"),
                     "--dtype", "float32", "--compute-dtype", "float32"]) == 0
    cfg, model = load_model(tmp_path / "ck")
    assert (cfg.param_dtype, cfg.dtype) == ("float32", "float32")
    tokens = _tokens(seed=3)
    got = np.asarray(model(jnp.asarray(tokens)))
    np.testing.assert_array_less(np.abs(got - lf.hf_logits(llama_dir, tokens)).max(), 1e-5)


def _llama_json(**changes):
    hf = lf.llama_config().to_dict()
    hf.update(changes)
    return hf


@pytest.mark.parametrize("changes, field", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_parameters.rope_type"),
    ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}}, "low_freq_factor"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 32}, "head_dim"),
    ({"pretraining_tp": 2}, "pretraining_tp"),
])
def test_unsupported_llama_fields_are_named(changes, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf_config(_llama_json(**changes))


def test_config_reads_both_rope_forms_alike():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    new = ModelConfig.from_hf_config(_llama_json(rope_parameters=scaling | {"rope_theta": 5e5}))
    old = _llama_json(rope_scaling=scaling, rope_theta=5e5, eos_token_id=[1, 5])
    del old["rope_parameters"]
    old = ModelConfig.from_hf_config(old)
    assert new.rope_scaling == old.rope_scaling == RopeScaling(**scaling)
    assert new.rope_theta == old.rope_theta == 5e5 and old.eos_token_id == (1, 5)
    assert old.to_hf_config()["eos_token_id"] == [1, 5]
    assert ModelConfig.from_hf_config(old.to_hf_config()) == old
