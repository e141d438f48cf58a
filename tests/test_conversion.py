"""HF <-> Flax conversion: bit-exact round trips through the CLI, every error at once, configs."""

import json

import numpy as np
import pytest
import torch

from tests import helpers
from llada_jax import cli
from llada_jax.model import params
from llada_jax.model.config import ConfigError, ModelConfig

SUPPORT_FILES = {"tokenizer.json": '{"fake": true}', "modeling_llada.py": "# remote code\n",
                 "configuration_llada.py": "# remote code\n", "generation_config.json": "{}"}


def _hf_dir(tmp_path, cfg, dtype, shards=3):
    state = {k: v.to(dtype) for k, v in helpers.random_state(cfg, seed=2).items()}
    path = helpers.write_hf_dir(tmp_path / "hf", cfg, state, shards=shards)
    for name, text in SUPPORT_FILES.items():
        (path / name).write_text(text)
    return path


def _tensors(path):
    return dict(params.iter_hf_tensors(path))


def _round_trip(tmp_path, hf_dir, *export_args):
    assert cli.main(["import-hf", "--hf-dir", str(hf_dir), "--out", str(tmp_path / "ckpt")]) == 0
    out = tmp_path / "exported"
    assert cli.main(["export-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(out),
                     "--source-hf-dir", str(hf_dir), *export_args]) == 0
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_round_trip_is_bit_exact(tmp_path, dtype, tied):
    cfg = helpers.hf_config(n_heads=4, n_kv_heads=2, weight_tying=tied)
    hf_dir = _hf_dir(tmp_path, cfg, dtype)
    out = _round_trip(tmp_path, hf_dir, "--max-shard-size", "20KB")
    before, after = _tensors(hf_dir), _tensors(out)
    assert sorted(after) == sorted(before)
    for name, original in before.items():
        assert after[name].dtype == original.dtype and after[name].shape == original.shape, name
        assert after[name].tobytes() == original.tobytes(), name
    index = json.loads((out / params.INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in before.values())
    for name, text in SUPPORT_FILES.items():
        assert (out / name).read_text() == text
    exported_cfg = json.loads((out / "config.json").read_text())
    assert exported_cfg.pop("llada_jax")["param_dtype"] == str(dtype).removeprefix("torch.")
    assert exported_cfg == cfg


def test_single_file_input_and_dtype_conversion(tmp_path):
    cfg = helpers.hf_config()
    hf_dir = _hf_dir(tmp_path, cfg, torch.bfloat16, shards=1)
    _, model = params.load_hf(hf_dir, dtype="float32")
    assert model.layers["q_proj"].dtype == np.float32
    out = tmp_path / "back"
    params.save_hf(model, out, dtype="bfloat16")
    assert not (out / params.INDEX_NAME).exists()   # one shard -> model.safetensors, no index
    before, after = _tensors(hf_dir), _tensors(out)
    assert all(after[n].tobytes() == before[n].tobytes() for n in before)  # bf16->fp32->bf16 exact


def test_flax_layout_of_linear_weights(tmp_path):
    """HF Linear [out, in] becomes [in, heads, head_dim] etc.; check one value per transform."""
    cfg = helpers.hf_config(n_heads=4, n_kv_heads=2)
    hf_dir = _hf_dir(tmp_path, cfg, torch.float32)
    hf = _tensors(hf_dir)
    _, model = params.load_hf(hf_dir)
    b = "model.transformer.blocks.1."
    q = np.asarray(model.layers["q_proj"][1])                 # [D, N, hd]
    assert q[5, 2, 7] == hf[b + "q_proj.weight"][2 * 12 + 7, 5]
    attn_out = np.asarray(model.layers["attn_out"][1])        # [N, hd, D]
    assert attn_out[3, 4, 9] == hf[b + "attn_out.weight"][9, 3 * 12 + 4]
    assert np.asarray(model.ff_out[...])[6, 50] == hf["model.transformer.ff_out.weight"][50, 6]


def test_every_weight_problem_is_reported_at_once(tmp_path):
    cfg = helpers.hf_config()
    state = helpers.random_state(cfg)
    del state["model.transformer.blocks.1.up_proj.weight"]
    state["model.transformer.blocks.0.q_proj.bias"] = torch.zeros(48)
    state["model.transformer.ln_f.weight"] = torch.ones(47)
    hf_dir = helpers.write_hf_dir(tmp_path, cfg, state)
    with pytest.raises(params.ConversionError) as err:
        params.load_hf(hf_dir)
    message = str(err.value)
    assert "3 problem(s)" in message
    assert "missing tensor model.transformer.blocks.1.up_proj.weight (expected shape [40, 48])" in message
    assert "unexpected tensor model.transformer.blocks.0.q_proj.bias" in message
    assert "model.transformer.ln_f.weight" in message and "[47]" in message and "[48]" in message


def test_mixed_dtypes_need_an_explicit_dtype(tmp_path):
    cfg = helpers.hf_config()
    state = helpers.random_state(cfg)
    state["model.transformer.ln_f.weight"] = state["model.transformer.ln_f.weight"].bfloat16()
    hf_dir = helpers.write_hf_dir(tmp_path, cfg, state)
    with pytest.raises(params.ConversionError, match=r"dtypes \['BF16', 'F32'\]; pass a dtype"):
        params.load_hf(hf_dir)
    cfg_out, _ = params.load_hf(hf_dir, dtype="float32")
    assert cfg_out.param_dtype == "float32"


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    assert cli.main(["import-hf", "--hf-dir", str(tmp_path), "--out", str(tmp_path / "c")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert cli.main(["export-hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "is neither a params checkpoint, a train workdir" in capsys.readouterr().err


@pytest.mark.parametrize("field, value", [
    ("block_type", "sequential"), ("alibi", True), ("include_bias", True), ("rope", False),
    ("activation_type", "swiglu"), ("layer_norm_type", "default"), ("block_group_size", 2),
    ("scale_logits", True), ("attention_layer_norm", True), ("include_qkv_bias", True)])
def test_unsupported_config_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"{field}={value!r}"):
        ModelConfig.from_hf_config(helpers.hf_config(**{field: value}))


def test_config_reads_hf_fields_and_round_trips():
    hf = helpers.hf_config(n_kv_heads=None, mlp_hidden_size=None, some_future_field=[1, 2])
    cfg = ModelConfig.from_hf_config(hf, dtype="float32", scan_layers=False)
    assert (cfg.n_kv_heads, cfg.mlp_hidden_size, cfg.head_dim) == (3, 4 * 48, 16)
    assert (cfg.vocab_size, cfg.embedding_size, cfg.mask_token_id) == (61, 64, 58)
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.rope_theta) == (60, 60, 10000.0)
    out = cfg.to_hf_config()
    assert out["llada_jax"] == {"causal": False, "scan_layers": False, "remat_policy": "none",
                                "param_dtype": "float32", "dtype": "float32",
                                "attention_impl": "xla"}
    assert out["some_future_field"] == [1, 2] and out["auto_map"] == hf["auto_map"]
    again = ModelConfig.from_hf_config(out)
    assert again.replace(hf_extra=()) == cfg.replace(hf_extra=()) and again.to_hf_config() == out
    hash(cfg)  # jit-static


def test_config_rejects_inconsistent_sizes():
    with pytest.raises(ConfigError, match="n_heads=4 is not divisible by n_kv_heads=3"):
        ModelConfig.from_hf_config(helpers.hf_config(n_heads=4, n_kv_heads=3))
    with pytest.raises(ConfigError, match="must be even for RoPE"):
        ModelConfig(d_model=45, n_heads=3, n_layers=1, mlp_hidden_size=8, vocab_size=10,
                    mask_token_id=9)
    with pytest.raises(ConfigError, match="model_type='mistral'"):  # llama: test_llama_import.py
        ModelConfig.from_hf_config({"model_type": "mistral"})
    fresh = ModelConfig(d_model=32, n_heads=4, n_layers=1, mlp_hidden_size=8, vocab_size=10,
                        mask_token_id=9).to_hf_config()
    assert fresh["block_type"] == "llama" and fresh["auto_map"]["AutoModel"].endswith("LLaDAModelLM")


def test_parse_size():
    assert params.parse_size("5GB") == 5 * 10**9
    assert params.parse_size("500MiB") == 500 * 2**20
    assert params.parse_size("123") == 123
    with pytest.raises(params.ConversionError, match="bad size"):
        params.parse_size("5 gigs")


def test_unknown_run_setting_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown run settings \['remat'\]"):
        ModelConfig.from_hf_config(helpers.hf_config(), remat="full")
