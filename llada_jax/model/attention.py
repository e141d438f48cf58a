"""Attention kernels of the transformer block: q [B, L, N, hd], k and v [B, L, K, hd] (GQA:
query head h uses KV head h // (N / K)) -> [B, L, N, hd].

    out = ATTENTION_IMPLS[cfg.attention_impl](q, k, v, mask)   # training / full forward
    out = cached_attention(q, k_cache, v_cache, visible, k_new, v_new, new_mask)   # decoding

`xla` is the reference (fp32 scores and softmax, a written-out backward), `dot_product_attention`
is jax.nn's (cuDNN on GPU when it applies), `splash` the TPU Pallas kernel (splash.py), which
takes a splash.SegmentMask where the others take the dense [B, L, L] visibility mask.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from llada_jax.model import splash
from llada_jax.model.config import ATTENTION_IMPL_NAMES


def _heads_first(q_blnh, k_blkh, v_blkh):
    """[B, L, heads, hd] -> q [B, K, G, L, hd], k and v [B, K, L, hd] (head h = k * G + g), so
    the attention products are plain batched matmuls (on XLA:CPU ~1.6x faster forward)."""
    batch, length, n_heads, head_dim = q_blnh.shape
    n_kv = k_blkh.shape[2]
    q = q_blnh.reshape(batch, length, n_kv, n_heads // n_kv, head_dim).transpose(0, 2, 3, 1, 4)
    return q, k_blkh.transpose(0, 2, 1, 3), v_blkh.transpose(0, 2, 1, 3)


def _blnh(x_bkglh):
    b, k, g, l, h = x_bkglh.shape
    return x_bkglh.transpose(0, 3, 1, 2, 4).reshape(b, l, k * g, h)


def _xla_attention_fwd(q_blnh, k_blkh, v_blkh, mask_bqk):
    q, k, v = _heads_first(q_blnh, k_blkh, v_blkh)
    scores = jnp.einsum("bkgqh,bksh->bkgqs", q, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(q.shape[-1]))
    if mask_bqk is not None:
        # A large finite negative (not -inf): a fully masked row averages instead of giving NaN.
        scores = jnp.where(mask_bqk[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bksh->bkgqh", probs, v)
    return _blnh(out), (q, k, v, probs, out, mask_bqk)


def _xla_attention_bwd(residuals, d_out_blnh):
    """Softmax backward as in FlashAttention: d scores = P (dP - rowsum(dO * O)) / sqrt(hd),
    with the row sums taken over head_dim (not over keys, fused into the dP matmul, which
    XLA:CPU ran ~1.6x slower for the whole attention backward)."""
    q, k, v, probs, out, mask_bqk = residuals
    b, n_kv, g, length, head_dim = q.shape
    d_out = d_out_blnh.reshape(b, length, n_kv, g, head_dim).transpose(0, 2, 3, 1, 4)
    f32 = jnp.float32
    d_v = jnp.einsum("bkgqs,bkgqh->bksh", probs, d_out, preferred_element_type=f32)
    d_probs = jnp.einsum("bkgqh,bksh->bkgqs", d_out, v, preferred_element_type=f32)
    row = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    d_scores = probs.astype(f32) * (d_probs - row) / jnp.sqrt(f32(head_dim))
    if mask_bqk is not None:  # hidden scores were replaced by a constant: no gradient
        d_scores = jnp.where(mask_bqk[:, None, None], d_scores, 0.0)
    d_scores = d_scores.astype(q.dtype)
    d_q = jnp.einsum("bkgqs,bksh->bkgqh", d_scores, k, preferred_element_type=f32)
    d_k = jnp.einsum("bkgqs,bkgqh->bksh", d_scores, q, preferred_element_type=f32)
    return (_blnh(d_q).astype(q.dtype), d_k.transpose(0, 2, 1, 3).astype(k.dtype),
            d_v.transpose(0, 2, 1, 3).astype(v.dtype), None)


@jax.custom_vjp
def xla_attention(q_blnh, k_blkh, v_blkh, mask_bqk):
    """Reference attention: fp32 scores and softmax, GQA by grouping query heads per KV head;
    the backward is written out (`_xla_attention_bwd`)."""
    return _xla_attention_fwd(q_blnh, k_blkh, v_blkh, mask_bqk)[0]


xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


def dot_product_attention(q_blnh, k_blkh, v_blkh, mask_bqk):
    """jax.nn.dot_product_attention (cuDNN on GPU when it applies, XLA otherwise)."""
    mask = None if mask_bqk is None else mask_bqk[:, None]
    return jax.nn.dot_product_attention(q_blnh, k_blkh, v_blkh, mask=mask)


# Name -> fn(q [B,L,N,hd], k [B,L,K,hd], v [B,L,K,hd], mask [B,L,L] | None) -> [B,L,N,hd].
# "splash" (TPU Pallas kernel) takes a splash.SegmentMask in place of the dense mask.
ATTENTION_IMPLS: dict[str, Callable] = {
    "xla": xla_attention,
    "dot_product_attention": dot_product_attention,
    "splash": splash.splash_attention,
}
assert tuple(ATTENTION_IMPLS) == ATTENTION_IMPL_NAMES, "keep config.ATTENTION_IMPL_NAMES in step"


def cached_attention(q_bknh, k_bskh, v_bskh, old_bs, k_new_bkKh, v_new_bkKh, new_bqk):
    """Attention of k new queries over a row's cached keys (visible where old_bs) and the k new
    keys themselves (where new_bqk: causal, padding hidden), as xla_attention computes it:
    fp32 scores, one softmax over both, GQA by grouping query heads per KV head."""
    q, k_old, v_old = _heads_first(q_bknh, k_bskh, v_bskh)
    k_new, v_new = k_new_bkKh.transpose(0, 2, 1, 3), v_new_bkKh.transpose(0, 2, 1, 3)
    n_new, low = new_bqk.shape[-1], jnp.finfo(jnp.float32).min
    scale = jnp.sqrt(jnp.float32(q.shape[-1]))
    old = jnp.einsum("bkgqh,bksh->bkgqs", q, k_old, preferred_element_type=jnp.float32) / scale
    new = jnp.einsum("bkgqh,bksh->bkgqs", q, k_new, preferred_element_type=jnp.float32) / scale
    old = jnp.where(old_bs[:, None, None, None, :], old, low)
    new = jnp.where(new_bqk[:, None, None], new, low)
    probs = jax.nn.softmax(jnp.concatenate([old, new], axis=-1), axis=-1).astype(v_old.dtype)
    out = (jnp.einsum("bkgqs,bksh->bkgqh", probs[..., :-n_new], v_old)
           + jnp.einsum("bkgqs,bksh->bkgqh", probs[..., -n_new:], v_new))
    return _blnh(out)
