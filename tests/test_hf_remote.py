"""Exports load in PyTorch through the project's own remote code (llada_jax/model/hf_remote):
`AutoModel.from_pretrained(export, trust_remote_code=True)` gives the Flax model's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModel, AutoModelForCausalLM

from llada_jax.model import params
from llada_jax.model.config import ModelConfig
from llada_jax.model.modeling import LLaDAModel
from tests import helpers

TOKENS = np.array([[5, 17, 3, 40, 22, 9, 58, 1, 33], [12, 58, 58, 7, 2, 44, 0, 0, 0]])
ATTENTION_MASK = np.array([[1] * 9, [1] * 6 + [0] * 3])


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def torch_logits(model, attention_mask=None):
    with torch.no_grad():
        mask = None if attention_mask is None else torch.from_numpy(attention_mask)
        return model(torch.from_numpy(TOKENS), attention_mask=mask).logits.numpy()


def flax_logits(model, attention_mask=None):
    mask = None if attention_mask is None else jnp.asarray(attention_mask)
    return np.asarray(model(jnp.asarray(TOKENS), attention_mask_bl=mask))


def assert_export_matches(model, export, auto_class=AutoModel):
    """Both without and with a padding mask: logits within 1e-5 (fp32) of the Flax model's."""
    loaded = auto_class.from_pretrained(export, trust_remote_code=True, dtype=torch.float32)
    assert type(loaded).__name__ == "LLaDAModelLM"
    for mask in (None, ATTENTION_MASK):
        want = flax_logits(model, mask)
        got = torch_logits(loaded, mask)
        assert got.shape == want.shape
        assert np.std(want) > 0.3  # O(1) logits, so 1e-5 is a real bound
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # The padding mask changes the real positions of the padded row, so it was applied.
    assert np.abs(flax_logits(model, ATTENTION_MASK)[1, :6] - flax_logits(model)[1, :6]).max() > 1e-3


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_export_of_an_imported_model_loads_with_our_remote_code(tmp_path, tied, kv_heads):
    cfg = helpers.hf_config(d_model=48, n_heads=4, n_kv_heads=kv_heads, weight_tying=tied)
    hf_dir = helpers.write_hf_dir(tmp_path / "hf", cfg, helpers.random_state(cfg, seed=3))
    _, model = params.load_hf(hf_dir, dtype="float32", compute_dtype="float32")
    export = tmp_path / "export"
    params.save_hf(model, export)  # no --source-hf-dir: the project's remote code is copied
    assert {p.name for p in export.glob("*.py")} == {"configuration_llada.py", "modeling_llada.py"}
    assert_export_matches(model, export)


def test_export_of_a_random_student_loads_as_causal_lm(tmp_path):
    """The demo's flow: a random-init student (config from to_hf_config's template) exported
    with save_hf and no source dir; AutoModelForCausalLM, as the template's auto_map names it."""
    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48,
                      vocab_size=64, mask_token_id=63, eos_token_id=62, pad_token_id=62,
                      dtype="float32", rope_theta=10000.0)
    model = LLaDAModel(cfg, rngs=nnx.Rngs(0))
    # O(1) weights (the init's 0.02 would make every logit nearly 0) and non-trivial norms.
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    new = [1.0 + 0.1 * jax.random.normal(key, x.shape)
           if "norm" in jax.tree_util.keystr(path) or "ln_f" in jax.tree_util.keystr(path)
           else jax.random.normal(key, x.shape) / np.sqrt(cfg.d_model)
           for (path, x), key in zip(leaves, keys)]
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, new))
    nnx.update(model, state)
    export = tmp_path / "exported"
    params.save_hf(model, export)
    assert_export_matches(model, export, AutoModelForCausalLM)
