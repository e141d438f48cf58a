"""KV-cached decoding: every call's logits equal a full recomputation; generate-teacher against
transformers' own greedy generate on a random LlamaForCausalLM."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaForCausalLM

from llada_jax import cli, sharding
from llada_jax.model.config import ModelConfig
from llada_jax.model.modeling import CACHE_AXES, LLaDAModel
from llada_jax.decode.cached import CacheError, CachedLM

TOL = 1e-5
PROMPTS = [[5, 9, 2, 7, 7, 3], [11, 4], [8, 1, 30, 2]]


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48,
                      vocab_size=40, mask_token_id=None, eos_token_id=None, causal=True,
                      dtype="float32", model_type="llama")
    return LLaDAModel(cfg, rngs=nnx.Rngs(0))


def _recompute(model, ids):
    """float32 [len(ids), V]: one fresh forward from position 0, no cache (right padding to a
    fixed length, which a causal model's earlier positions cannot see)."""
    tokens = np.zeros((1, 32), np.int32)
    tokens[0, :len(ids)] = ids
    return np.asarray(_forward(nnx.split(model), jnp.asarray(tokens)))[0, :len(ids)]


@jax.jit
def _forward(split, tokens_bl):
    return nnx.merge(*split)(tokens_bl)


def _check(model, rows, logits_bkv):
    """rows[b] = the row's tokens so far; logits_bkv[b, j] must be the distribution after
    rows[b][: len - k + j + 1]."""
    k = logits_bkv.shape[1]
    for b, ids in enumerate(rows):
        want = _recompute(model, ids)[len(ids) - k:]
        np.testing.assert_array_less(np.abs(np.asarray(logits_bkv[b]) - want).max(), TOL)


def _drive(model, mesh=None):
    """Prefill, single steps, a 3-token extend, rollback, extend again: checked at every call."""
    width = 8
    lm = CachedLM(model, batch_size=3, max_length=20, mesh=mesh)
    tokens = np.zeros((3, width), np.int32)
    pads = np.array([width - len(p) for p in PROMPTS], np.int32)
    for b, p in enumerate(PROMPTS):
        tokens[b, pads[b]:] = p
    rows = [list(p) for p in PROMPTS]
    _check(model, rows, lm.prefill(tokens, pads)[:, None])
    rng = np.random.default_rng(0)
    for _ in range(3):
        new = rng.integers(0, 40, (3, 1))
        rows = [r + new[b].tolist() for b, r in enumerate(rows)]
        _check(model, rows, lm.extend(new))
    new = rng.integers(0, 40, (3, 3))  # a verifier's call: 3 drafted tokens per row
    rows = [r + new[b].tolist() for b, r in enumerate(rows)]
    _check(model, rows, lm.extend(new))
    assert lm.lengths.tolist() == [len(r) for r in rows]
    keep = np.array([len(rows[0]) - 3, len(rows[1]), len(rows[2]) - 1])  # per-row rejections
    lm.rollback(keep)
    rows = [r[:n] for r, n in zip(rows, keep)]
    new = rng.integers(0, 40, (3, 2))
    rows = [r + new[b].tolist() for b, r in enumerate(rows)]
    _check(model, rows, lm.extend(new))
    return lm


def test_cached_logits_equal_recomputation_at_every_call(model):
    lm = _drive(model)
    with pytest.raises(CacheError, match="do not fit the cache"):
        lm.extend(np.zeros((3, 8), np.int32))
    with pytest.raises(CacheError, match="rollback"):
        lm.rollback(lm.lengths + 1)


def test_sharded_cache_matches_and_is_split_over_rows_and_heads(model):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])
    state = nnx.state(model)
    placed = jax.device_put(state, sharding.param_shardings(state, mesh))
    sharded = nnx.merge(nnx.graphdef(model), placed)
    # batch 3 does not divide data=2: rows stay whole; heads (2 KV) split over tensor.
    lm = _drive(sharded, mesh)
    want = sharding.spec_for(lm.cache.k.shape, CACHE_AXES, mesh, sharding.DEFAULT_RULES, strict=False)
    assert "tensor" in str(want)
    assert lm.cache.k.sharding.is_equivalent_to(jax.NamedSharding(mesh, want), lm.cache.k.ndim)


# ------------------------------------------------------- generate-teacher vs transformers.generate

def test_generate_teacher_equals_transformers_greedy_generate(llama_teacher, tmp_path):
    hf_dir, tok = llama_teacher
    prompts = ["the cat sat", "a quick brown fox jumps over", "dog"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    new = 24  # the sequences pass the original context (16) of the llama3 scaling
    assert cli.main(["generate-teacher", "--teacher", str(hf_dir), "--prompts", str(tmp_path / "p.txt"),
                     "--out", str(tmp_path / "t.jsonl"), "--greedy", "--full-logits",
                     "--max-new-tokens", str(new), "--batch-size", "2"]) == 0
    records = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    for prompt, record in zip(prompts, records):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=new, output_logits=True, return_dict_in_generate=True,
                              eos_token_id=2, pad_token_id=1)
        want_ids = out.sequences[0, ids.shape[1]:].tolist()
        got_ids = [e["chosen_token_id"] for e in record["logits"]]
        assert got_ids == want_ids[:len(got_ids)]
        assert len(got_ids) == new or got_ids[-1] == 2  # stopped only at eos
        for entry, logits in zip(record["logits"], out.logits):
            np.testing.assert_allclose(entry["full_logits"], logits[0].numpy(), atol=2e-5)
