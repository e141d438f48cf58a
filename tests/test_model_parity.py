"""LLaDAModel vs an independent torch forward (tests/torch_reference.py), through the converter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests import helpers
import torch_reference
from llada_jax.model import params
from llada_jax.model.config import ModelConfig
from llada_jax.model.modeling import LLaDAModel

TOL = 1e-5

CONFIGS = {
    "mha_odd": helpers.hf_config(),                                   # d 48, 3 heads, V 61/64
    "gqa": helpers.hf_config(d_model=48, n_heads=6, n_kv_heads=2, mlp_hidden_size=56),
    "mqa_tied": helpers.hf_config(n_heads=4, n_kv_heads=1, weight_tying=True, n_layers=3),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def loaded(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    state = helpers.random_state(cfg, seed=1)
    hf_dir = helpers.write_hf_dir(tmp_path_factory.mktemp(request.param), cfg, state)
    _, model = params.load_hf(hf_dir, compute_dtype="float32")
    return cfg, state, model


def _variant(model, **changes):
    """The same weights under other run settings (the fixture's model stays as it is)."""
    other = nnx.clone(model)
    other.cfg = model.cfg.replace(**changes)
    return other


def _tokens(batch, length, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def _reference(state, cfg, tokens, **kw):
    kw = {k: torch.as_tensor(np.asarray(v)) for k, v in kw.items() if k != "causal"} | (
        {"causal": True} if kw.get("causal") else {})
    with torch.no_grad():
        return torch_reference.forward(state, cfg, torch.as_tensor(tokens).long(), **kw).numpy()


def _assert_close(ours, ref):
    ours = np.asarray(ours)
    assert 0.5 < np.abs(ref).max() < 10, "logits should be O(1) for a meaningful tolerance"
    np.testing.assert_array_less(np.abs(ours - ref).max(), TOL)


@pytest.mark.parametrize("impl", ["xla", "dot_product_attention"])
def test_logits_match_reference(loaded, impl):
    cfg, state, model = loaded
    model = _variant(model, attention_impl=impl)
    tokens = _tokens(2, 11, cfg["vocab_size"])
    _assert_close(model(jnp.asarray(tokens)), _reference(state, cfg, tokens))


def test_padding_mask_matches_reference_and_unpadded_run(loaded):
    cfg, state, model = loaded
    tokens = _tokens(2, 9, cfg["vocab_size"], seed=1)
    keep = np.ones((2, 9), bool)
    keep[0, 6:] = False       # right padding
    keep[1, :3] = False       # left padding
    ours = np.asarray(model(jnp.asarray(tokens), attention_mask_bl=jnp.asarray(keep)))
    _assert_close(ours, _reference(state, cfg, tokens, key_mask_bl=keep))
    alone = _reference(state, cfg, tokens[:1, :6])  # the real tokens of row 0, no padding at all
    np.testing.assert_array_less(np.abs(ours[0, :6] - alone[0]).max(), TOL)


def test_packed_row_equals_examples_run_separately(loaded):
    cfg, state, model = loaded
    lengths = (5, 4)
    tokens = _tokens(1, 12, cfg["vocab_size"], seed=2)
    segments = np.array([[1] * 5 + [2] * 4 + [0] * 3], np.int32)
    positions = np.array([list(range(5)) + list(range(4)) + [0] * 3], np.int32)
    packed = np.asarray(model(jnp.asarray(tokens), positions_bl=jnp.asarray(positions),
                              segment_ids_bl=jnp.asarray(segments)))
    start = 0
    for length in lengths:
        alone = _reference(state, cfg, tokens[:, start:start + length])
        _assert_close(packed[:, start:start + length], alone)
        start += length
    # Positions default to restarting per segment when only segment ids are given.
    default_pos = model(jnp.asarray(tokens), segment_ids_bl=jnp.asarray(segments))
    np.testing.assert_array_equal(np.asarray(default_pos)[:, :9], packed[:, :9])


def test_causal_mode_matches_reference(loaded):
    cfg, state, model = loaded
    model = _variant(model, causal=True)
    tokens = _tokens(2, 7, cfg["vocab_size"], seed=3)
    _assert_close(model(jnp.asarray(tokens)), _reference(state, cfg, tokens, causal=True))


def test_hidden_times_head_is_logits_and_padding_rows_are_finite(loaded):
    cfg, state, model = loaded
    tokens = jnp.asarray(_tokens(2, 6, cfg["vocab_size"], seed=4))
    empty = jnp.zeros((2, 6), bool).at[1].set(True)   # row 0 is all padding
    hidden = model(tokens, attention_mask_bl=empty, return_hidden=True)
    logits = model(tokens, attention_mask_bl=empty)
    assert np.isfinite(np.asarray(logits)).all()
    head = model.lm_head_weight()
    assert head.shape == (cfg["d_model"], cfg["embedding_size"])
    np.testing.assert_allclose(np.asarray(hidden @ head), np.asarray(logits), rtol=0, atol=1e-6)
    if cfg["weight_tying"]:
        np.testing.assert_array_equal(np.asarray(head), state["model.transformer.wte.weight"].numpy().T)


def test_bf16_compute_stays_close_to_fp32(loaded):
    """bf16 compute (the training default) is a rounding of the same function, not another one."""
    cfg, state, model = loaded
    tokens = _tokens(2, 8, cfg["vocab_size"], seed=5)
    ref = _reference(state, cfg, tokens)
    model = _variant(model, dtype="bfloat16")
    ours = np.asarray(model(jnp.asarray(tokens)))
    assert ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 0.15
    assert model(jnp.asarray(tokens), return_hidden=True).dtype == jnp.bfloat16


def _random_model(**changes):
    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=24,
                      vocab_size=40, mask_token_id=39, dtype="float32", **changes)
    return LLaDAModel(cfg, rngs=nnx.Rngs(7))


def _loss_and_grads(model, tokens, segments):
    graphdef, state = nnx.split(model)
    weights = jax.random.normal(jax.random.key(1), tokens.shape + (model.cfg.embedding_size,))

    def loss(s):
        return jnp.sum(nnx.merge(graphdef, s)(tokens, segment_ids_bl=segments) * weights)

    value, grads = jax.jit(jax.value_and_grad(loss))(state)
    remat_in_graph = "remat" in str(jax.make_jaxpr(loss)(state))  # jax.checkpoint's primitive
    assert remat_in_graph == (model.cfg.remat_policy != "none")
    return value, nnx.to_pure_dict(grads)


def test_scanned_and_unscanned_layers_and_remat_policies_agree():
    tokens = jnp.asarray(_tokens(2, 9, 40, seed=6))
    segments = jnp.asarray([[1] * 4 + [2] * 5, [1] * 7 + [0] * 2], jnp.int32)
    ref_value, ref_grads = _loss_and_grads(_random_model(scan_layers=True), tokens, segments)
    assert np.abs(np.asarray(ref_grads["layers"]["q_proj"])).max() > 0
    # Every policy, scanned and unscanned each at least once (each case is a compile: keep few).
    for scan, policy in ((False, "none"), (True, "full"), (False, "dots")):
        value, grads = _loss_and_grads(_random_model(scan_layers=scan, remat_policy=policy),
                                       tokens, segments)
        np.testing.assert_allclose(value, ref_value, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     grads, ref_grads)


def test_xla_attention_gradients_match_torch_autograd():
    """The written-out attention backward (GQA 6 query / 2 KV heads, padding keys, one query row
    with every key hidden) against torch autograd of the plain formula, fp32."""
    from llada_jax.model.attention import xla_attention

    rng = np.random.default_rng(3)
    b, length, n_heads, n_kv, head_dim = 2, 7, 6, 2, 8
    q, k, v, w = (rng.normal(size=(b, length, h, head_dim)).astype(np.float32)
                  for h in (n_heads, n_kv, n_kv, n_heads))
    mask = np.ones((b, length, length), bool)
    mask[0, :, 5:] = False   # padding keys
    mask[1, 3, :] = False    # a query that sees nothing (averages all values)

    def ours(q, k, v):
        return jnp.sum(xla_attention(q, k, v, jnp.asarray(mask)) * w)

    got = jax.grad(ours, argnums=(0, 1, 2))(*(jnp.asarray(x) for x in (q, k, v)))

    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    group = n_heads // n_kv
    kk, vv = (t.repeat_interleave(group, dim=2) for t in (tk, tv))
    scores = torch.einsum("bqnh,bsnh->bnqs", tq, kk) / head_dim ** 0.5
    scores = scores.masked_fill(~torch.as_tensor(mask)[:, None], torch.finfo(torch.float32).min)
    out = torch.einsum("bnqs,bsnh->bqnh", torch.softmax(scores, -1), vv)
    (out * torch.as_tensor(w)).sum().backward()
    for ours_grad, ref in zip(got, (tq.grad, tk.grad, tv.grad)):
        assert np.abs(ref.numpy()).max() > 0.1
        np.testing.assert_allclose(np.asarray(ours_grad), ref.numpy(), rtol=1e-4, atol=1e-5)


def test_swiglu_gradients_match_torch_autograd():
    """The written-out MLP backward against torch autograd of down(silu(x gate) * (x up)),
    fp32; bf16 inputs give gradients in bf16 within bf16 rounding of the fp32 ones."""
    from llada_jax.model.modeling import swiglu

    rng = np.random.default_rng(4)
    b, length, d, f = 2, 5, 8, 12
    x, w = (rng.normal(size=(b, length, d)).astype(np.float32) for _ in range(2))
    gate, up = (rng.normal(size=(d, f)).astype(np.float32) for _ in range(2))
    down = rng.normal(size=(f, d)).astype(np.float32)

    def grads(dtype):
        def loss(*args):
            return jnp.sum(swiglu(*args).astype(jnp.float32) * w)
        return jax.grad(loss, argnums=(0, 1, 2, 3))(
            *(jnp.asarray(a, dtype) for a in (x, gate, up, down)))

    tx, tg, tu, td = (torch.tensor(a, requires_grad=True) for a in (x, gate, up, down))
    out = (torch.nn.functional.silu(tx @ tg) * (tx @ tu)) @ td
    (out * torch.as_tensor(w)).sum().backward()
    refs = (tx.grad, tg.grad, tu.grad, td.grad)
    for ours_grad, ref in zip(grads(jnp.float32), refs):
        assert np.abs(ref.numpy()).max() > 1.0
        np.testing.assert_allclose(np.asarray(ours_grad), ref.numpy(), rtol=1e-5, atol=1e-5)
    for ours_grad, ref in zip(grads(jnp.bfloat16), refs):
        assert ours_grad.dtype == jnp.bfloat16
        scale = np.abs(ref.numpy()).max()
        np.testing.assert_allclose(np.asarray(ours_grad, np.float32), ref.numpy(),
                                   rtol=0.05, atol=0.03 * scale)
