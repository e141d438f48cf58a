"""Splash attention (Pallas interpret mode on CPU) against the model's XLA reference attention.

Packed rows with padding, bidirectional and causal, GQA; values and gradients on real positions
(padding queries are don't-care: see llada_jax/splash.py); per device under a mesh; the model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import sharding

from llada_jax.model import splash
from llada_jax.model.config import ModelConfig
from llada_jax.model.attention import xla_attention
from llada_jax.model.modeling import LLaDAModel, visibility_mask

# L = 384: three 128-tiles per axis, so the kernel's block skipping (causal, segments) is used.
B, L, N, K, HD = 2, 384, 4, 2, 32


def packed_segments() -> np.ndarray:
    """Row 0: three packed examples, then padding; row 1: one example, padding, left padded."""
    seg = np.zeros((B, L), np.int32)
    seg[0, :100], seg[0, 100:250], seg[0, 250:370] = 1, 2, 3
    seg[1, 5:300] = 1
    return seg


def qkv(n_kv: int, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (B, L, N, HD)),
            jax.random.normal(keys[1], (B, L, n_kv, HD)),
            jax.random.normal(keys[2], (B, L, n_kv, HD)))


def loss_and_grads(attn, q, k, v, mask, real_bl, weights_blnh):
    """A loss over real query positions only, and its gradients w.r.t. q, k, v."""
    def loss(q, k, v):
        out = attn(q, k, v, mask)
        return jnp.sum(out * weights_blnh * real_bl[:, :, None, None])
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_kv", [K, N])
def test_splash_matches_reference(causal, n_kv):
    seg = jnp.asarray(packed_segments())
    tokens = jnp.zeros((B, L), jnp.int32)
    real = seg > 0
    q, k, v = qkv(n_kv)
    ref_mask = visibility_mask(tokens, seg, None, causal)
    want = xla_attention(q, k, v, ref_mask)
    got = jax.jit(splash.splash_attention)(q, k, v, splash.segment_mask(tokens, seg, None, causal))
    np.testing.assert_allclose(np.asarray(got)[np.asarray(real)], np.asarray(want)[np.asarray(real)],
                               atol=2e-5, rtol=2e-5)

    weights = jax.random.normal(jax.random.key(1), q.shape)
    ref_loss, ref_grads = loss_and_grads(xla_attention, q, k, v, ref_mask, real, weights)
    loss, grads = loss_and_grads(splash.splash_attention, q, k, v,
                                 splash.segment_mask(tokens, seg, None, causal), real, weights)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref, atol=1e-4, rtol=1e-4)


def test_segment_mask_from_model_inputs():
    tokens = jnp.zeros((2, 4), jnp.int32)
    attn = jnp.array([[1, 1, 1, 0], [0, 1, 1, 1]])
    seg = jnp.array([[1, 1, 2, 2], [1, 1, 1, 2]])
    np.testing.assert_array_equal(splash.segment_mask(tokens, None, None, False).segment_ids_bl, 1)
    np.testing.assert_array_equal(splash.segment_mask(tokens, None, attn, False).segment_ids_bl,
                                  attn)
    np.testing.assert_array_equal(splash.segment_mask(tokens, seg, attn, True).segment_ids_bl,
                                  [[1, 1, 2, 0], [0, 1, 1, 2]])
    # The causal flag is static: it lives in the treedef, not among the leaves.
    leaves = jax.tree.leaves(splash.segment_mask(tokens, seg, None, True))
    assert len(leaves) == 1 and leaves[0].shape == seg.shape


def test_block_sizes_need_lane_multiples():
    assert splash.block_sizes(4096).block_q == 512
    assert splash.block_sizes(384).block_kv == 128
    with pytest.raises(ValueError, match="multiple of 128"):
        splash.block_sizes(200)


@pytest.mark.parametrize("tensor", [2, 4])  # 4 does not divide K = 2: K/V repeated to N heads
def test_splash_per_device_under_a_mesh(tensor):
    seg = jnp.asarray(packed_segments())
    tokens = jnp.zeros((B, L), jnp.int32)
    q, k, v = qkv(K)
    want = xla_attention(q, k, v, visibility_mask(tokens, seg, None, False))
    mesh = sharding.make_mesh({"tensor": tensor, "data": 8 // tensor}, jax.devices()[:8])
    with jax.set_mesh(mesh), sharding.rules_context(sharding.DEFAULT_RULES):
        got = jax.jit(splash.splash_attention)(q, k, v, splash.segment_mask(tokens, seg, None, False))
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5, rtol=2e-5)


def test_model_with_splash_equals_xla_on_real_positions():
    cfg = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=96,
                      vocab_size=97, mask_token_id=96, dtype="float32", causal=False)
    model = LLaDAModel(cfg, rngs=nnx.Rngs(0))
    seg = jnp.asarray(packed_segments()[:, :256])
    tokens = jax.random.randint(jax.random.key(2), seg.shape, 0, 97) * (seg > 0)
    want = model(tokens, segment_ids_bl=seg)
    model.cfg = cfg.replace(attention_impl="splash")
    got = model(tokens, segment_ids_bl=seg)
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-4, rtol=1e-4)
