"""LLaDA in Flax NNX: a LLaMA-style transformer, bidirectional by default, layers stacked.

    cfg = ModelConfig.from_hf_config(json.load(open("config.json")))
    model = LLaDAModel(cfg, rngs=nnx.Rngs(0))
    logits_blv = model(tokens_bl)                                  # float32 [B, L, V]
    hidden_bld = model(tokens_bl, return_hidden=True)              # after ln_f, compute dtype
    head_dv = model.lm_head_weight()                               # logits == hidden @ head
    cache = init_cache(cfg, B, S)                                  # causal models: KV cache
    logits_bkv, cache = model.extend(tokens_bk, cache)             # append k tokens per row

Per block (DESIGN.md): h = x + attn_out(Attn(attn_norm(x))); y = h + ff_out(silu(ff_proj(n)) *
up_proj(n)) with n = ff_norm(h). Every block parameter is stacked on a leading 'layers' axis;
the blocks run as one `jax.lax.scan` (or a Python loop, `scan_layers=False`) over a pure
function of one layer's weights, optionally under `jax.checkpoint` (`remat_policy`).
Params are stored in `param_dtype` and cast to the compute `dtype` where used.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from llada_jax.model import rope, splash
from llada_jax.model.attention import ATTENTION_IMPLS, cached_attention
from llada_jax.model.config import REMAT_POLICY_NAMES, ModelConfig
from llada_jax.sharding import constrain

# Block parameters: name -> logical axes after 'layers'. Shapes in LLaDAModel.__init__.
BLOCK_AXES: dict[str, tuple[str, ...]] = {
    "attn_norm": ("norm",),
    "q_proj": ("embed", "q_heads", "head_dim"),
    "k_proj": ("embed", "kv_heads", "head_dim"),
    "v_proj": ("embed", "kv_heads", "head_dim"),
    "attn_out": ("q_heads", "head_dim", "embed"),
    "ff_norm": ("norm",),
    "ff_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "ff_out": ("mlp", "embed"),
}

# Name -> jax.checkpoint policy per layer ("none": no rematerialisation, no jax.checkpoint).
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep the weight matmuls' outputs, recompute attention scores and elementwise ops.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
assert tuple(REMAT_POLICIES) == REMAT_POLICY_NAMES, "keep config.REMAT_POLICY_NAMES in step"


def _param(rngs: nnx.Rngs | None, shape: tuple[int, ...], names: tuple[str, ...],
           dtype: jnp.dtype) -> nnx.Param:
    """Normal(0.02) weights (ones for norms, rngs=None); logical axis names as metadata."""
    value = (jnp.ones(shape, dtype) if rngs is None
             else 0.02 * jax.random.normal(rngs.params(), shape, dtype))
    # eager_sharding=False: the names are logical; sharding.param_shardings maps them to a mesh.
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF order: normalise in fp32, cast back to x's dtype, then times weight."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * weight.astype(x.dtype)


def rope_tables(positions_bl: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """(sin, cos) float32 [B, L, head_dim] for the half-split rotation; positions absolute;
    inverse frequencies with the config's scaling (rope.py)."""
    inv_freq_h = rope.inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    freqs = positions_bl.astype(jnp.float32)[..., None] * inv_freq_h
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x_blhd: jax.Array, sin_bld: jax.Array, cos_bld: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin in fp32, rotate_half(x) = cat(-x2, x1)."""
    x = x_blhd.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x * cos_bld[:, :, None, :] + rotated * sin_bld[:, :, None, :]
    return out.astype(x_blhd.dtype)


def visibility_mask(tokens_bl: jax.Array, segment_ids_bl: jax.Array | None,
                   attention_mask_bl: jax.Array | None, causal: bool) -> jax.Array | None:
    """bool [B, L(query), L(key)]: True where the query may attend to the key (None: all).

    Keys that are padding (attention_mask 0, or segment 0) are hidden; packed segments see only
    themselves. A query with no visible key (a padding row) still gets finite output.
    """
    batch, length = tokens_bl.shape
    mask = None
    if attention_mask_bl is not None:
        mask = jnp.broadcast_to(attention_mask_bl.astype(bool)[:, None, :], (batch, length, length))
    if segment_ids_bl is not None:
        same = segment_ids_bl[:, :, None] == segment_ids_bl[:, None, :]
        seg_mask = same & (segment_ids_bl[:, None, :] != 0)
        mask = seg_mask if mask is None else mask & seg_mask
    if causal:
        lower = jnp.tril(jnp.ones((length, length), bool))[None]
        mask = lower if mask is None else mask & lower
    return mask


def positions_from_segments(segment_ids_bl: jax.Array) -> jax.Array:
    """int32 [B, L]: position within each run of equal segment ids (restarts at 0 per segment)."""
    idx = jnp.broadcast_to(jnp.arange(segment_ids_bl.shape[1], dtype=jnp.int32), segment_ids_bl.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids_bl[:, :1], bool),
                              segment_ids_bl[:, 1:] != segment_ids_bl[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def _swiglu_fwd(x_bld, w_gate_df, w_up_df, w_down_fd):
    gate = jnp.einsum("bld,df->blf", x_bld, w_gate_df)
    up = jnp.einsum("bld,df->blf", x_bld, w_up_df)
    act = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    return jnp.einsum("blf,fd->bld", act, w_down_fd), (x_bld, gate, up, w_gate_df, w_up_df,
                                                       w_down_fd)


def _swiglu_bwd(residuals, d_y_bld):
    x, gate, up, w_gate, w_up, w_down = residuals
    d_act = jnp.einsum("bld,fd->blf", d_y_bld, w_down)
    g, u, da = gate.astype(jnp.float32), up.astype(jnp.float32), d_act.astype(jnp.float32)
    sig = jax.nn.sigmoid(g)
    silu = g * sig
    act = (silu * u).astype(gate.dtype)
    d_up = constrain((da * silu).astype(gate.dtype), ("batch", "length", "act_mlp"))
    d_gate = constrain((da * u * sig * (1.0 + g * (1.0 - sig))).astype(gate.dtype),
                       ("batch", "length", "act_mlp"))
    d_x = (jnp.einsum("blf,df->bld", d_gate, w_gate)
           + jnp.einsum("blf,df->bld", d_up, w_up)).astype(x.dtype)
    return (d_x, jnp.einsum("bld,blf->df", x, d_gate), jnp.einsum("bld,blf->df", x, d_up),
            jnp.einsum("blf,bld->fd", act, d_y_bld))


@jax.custom_vjp
def swiglu(x_bld, w_gate_df, w_up_df, w_down_fd):
    """ff_out(silu(ff_proj(x)) * up_proj(x)) with a written-out backward: the residuals are
    x, gate and up (autodiff also keeps silu(gate) and the product), and the weight gradients
    contract over the tokens of operands made in natural layout; on XLA:CPU this MLP's
    forward + backward ran ~20% faster (8 layers, d 512, L 512). Checked against autodiff in
    tests/test_model_parity.py."""
    return _swiglu_fwd(x_bld, w_gate_df, w_up_df, w_down_fd)[0]


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def _qkv(cfg: ModelConfig, w: dict[str, jax.Array], x_bld, sin_bld, cos_bld):
    """The block's attention inputs: q [B, L, N, hd], k and v [B, L, K, hd] (RoPE applied)."""
    cast = lambda name: w[name].astype(x_bld.dtype)
    normed = rms_norm(x_bld, w["attn_norm"], cfg.rms_norm_eps)
    q = apply_rope(jnp.einsum("bld,dnh->blnh", normed, cast("q_proj")), sin_bld, cos_bld)
    k = apply_rope(jnp.einsum("bld,dkh->blkh", normed, cast("k_proj")), sin_bld, cos_bld)
    v = jnp.einsum("bld,dkh->blkh", normed, cast("v_proj"))
    return (constrain(q, ("batch", "length", "act_heads", "head_dim")),
            constrain(k, ("batch", "length", "act_kv_heads", "head_dim")),
            constrain(v, ("batch", "length", "act_kv_heads", "head_dim")))


def block_forward(cfg: ModelConfig, w: dict[str, jax.Array], x_bld: jax.Array,
                  sin_bld: jax.Array, cos_bld: jax.Array, mask_bqk: jax.Array | None) -> jax.Array:
    """One LLaMA-style block; `w` holds one layer's weights (param dtype), x in compute dtype."""
    q, k, v = _qkv(cfg, w, x_bld, sin_bld, cos_bld)
    return _block_rest(cfg, w, x_bld, ATTENTION_IMPLS[cfg.attention_impl](q, k, v, mask_bqk))


def _block_rest(cfg: ModelConfig, w: dict[str, jax.Array], x_bld, attn_blnh) -> jax.Array:
    """The block after attention: output projection, residual, MLP, residual."""
    cast = lambda name: w[name].astype(x_bld.dtype)
    h = x_bld + jnp.einsum("blnh,nhd->bld", attn_blnh, cast("attn_out"))
    h = constrain(h, ("batch", "length", "act_embed"))
    normed = rms_norm(h, w["ff_norm"], cfg.rms_norm_eps)
    # Under remat, autodiff keeps the policy's say over what is saved; otherwise the MLP's
    # backward is the written-out one (`swiglu`).
    mlp = swiglu if cfg.remat_policy == "none" else lambda *a: _swiglu_fwd(*a)[0]
    y = h + mlp(normed, cast("ff_proj"), cast("up_proj"), cast("ff_out"))
    return constrain(y, ("batch", "length", "act_embed"))


class KVCache(NamedTuple):
    """Keys and values of a causal model's past tokens, per row (a pytree; see extend()).

    k, v [B, layers, S, K, hd] in compute dtype; row b holds real tokens in slots
    start_b .. length_b - 1 (left padding before start_b; slots from length_b on are stale or
    empty, so lowering length_b rolls the row back without touching k, v).
    """
    k: jax.Array
    v: jax.Array
    start_b: jax.Array   # int32 [B]
    length_b: jax.Array  # int32 [B]


CACHE_AXES = ("batch", "layers", "cache_length", "act_kv_heads", "head_dim")


def init_cache(cfg: ModelConfig, batch_size: int, max_length: int) -> KVCache:
    """An empty cache for `batch_size` rows of up to `max_length` slots (compute dtype)."""
    shape = (batch_size, cfg.n_layers, max_length, cfg.n_kv_heads, cfg.head_dim)
    zeros = lambda: constrain(jnp.zeros(shape, jnp.dtype(cfg.dtype)), CACHE_AXES)
    empty = jnp.zeros((batch_size,), jnp.int32)
    return KVCache(zeros(), zeros(), empty, empty)


def _write_slots(cache_blskh, new_lbkKh, length_b):
    """cache[b, :, length_b : length_b + k] = new[:, b] for every row: one scatter batched over
    rows after all layers ran (so the donated cache is updated in place, never copied, and
    under a mesh each device writes its own rows and heads)."""
    def one_row(c_lskh, u_lkKh, at):
        return jax.lax.dynamic_update_slice(c_lskh, u_lkKh.astype(c_lskh.dtype), (0, at, 0, 0))
    new_blkKh = new_lbkKh.transpose(1, 0, 2, 3, 4)
    return constrain(jax.vmap(one_row)(cache_blskh, new_blkKh, length_b), CACHE_AXES)


class LLaDAModel(nnx.Module):
    """LLaDA / LLaMA-style transformer (see the module docstring for the call API)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.param_dtype)
        d, v, n_layers = cfg.d_model, cfg.embedding_size, cfg.n_layers
        dims = {"norm": d, "embed": d, "q_heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
                "head_dim": cfg.head_dim, "mlp": cfg.mlp_hidden_size}
        self.wte = _param(rngs, (v, d), ("vocab", "embed"), dtype)
        self.layers = nnx.Dict({
            name: _param(None if name.endswith("norm") else rngs,
                         (n_layers,) + tuple(dims[a] for a in axes), ("layers",) + axes, dtype)
            for name, axes in BLOCK_AXES.items()})
        self.ln_f = _param(None, (d,), ("norm",), dtype)
        self.ff_out = None if cfg.weight_tying else _param(rngs, (d, v), ("embed", "vocab"), dtype)

    def lm_head_weight(self) -> jax.Array:
        """[D, V] in param dtype: ff_out's kernel, or wte.T when embeddings are tied."""
        return self.wte[...].T if self.ff_out is None else self.ff_out[...]

    def __call__(self, tokens_bl: jax.Array, positions_bl: jax.Array | None = None,
                 segment_ids_bl: jax.Array | None = None, attention_mask_bl: jax.Array | None = None,
                 return_hidden: bool = False) -> jax.Array:
        """tokens int [B, L] -> logits float32 [B, L, V], or hidden [B, L, D] (compute dtype).

        positions_bl: default arange(L), or restarting per segment when segment_ids_bl is given.
        segment_ids_bl: 1..n packed examples, 0 padding (block-diagonal attention).
        attention_mask_bl: 1 = real token, 0 = padding key (hidden from every query).
        """
        cfg = self.cfg
        if positions_bl is None:
            positions_bl = (jnp.broadcast_to(jnp.arange(tokens_bl.shape[1]), tokens_bl.shape)
                            if segment_ids_bl is None else positions_from_segments(segment_ids_bl))
        sin, cos = rope_tables(positions_bl, cfg)
        mask_fn = splash.segment_mask if cfg.attention_impl == "splash" else visibility_mask
        mask = mask_fn(tokens_bl, segment_ids_bl, attention_mask_bl, cfg.causal)
        x = jnp.take(self.wte[...], tokens_bl, axis=0).astype(jnp.dtype(cfg.dtype))
        x = constrain(x, ("batch", "length", "act_embed"))
        x = self._run_layers(x, sin, cos, mask)
        hidden = rms_norm(x, self.ln_f[...], cfg.rms_norm_eps)
        return hidden if return_hidden else self._logits(hidden)

    def _logits(self, hidden_bld: jax.Array) -> jax.Array:
        logits = jnp.einsum("bld,dv->blv", hidden_bld, self.lm_head_weight().astype(hidden_bld.dtype),
                            preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "act_vocab"))

    def extend(self, tokens_bk: jax.Array, cache: KVCache,
               all_logits: bool = True) -> tuple[jax.Array, KVCache]:
        """Appends k tokens to every row of a causal model's cache: (logits, new cache).

        Row b's tokens go to slots length_b .. length_b + k - 1 at positions slot - start_b
        and attend to the row's cached slots start_b .. length_b - 1 and causally to each
        other; their keys and values are written once all layers ran. logits float32 [B, k, V] (index j: next-token logits after token j), or
        [B, 1, V] after the last token only (`all_logits=False`, e.g. a prefill).
        """
        cfg = self.cfg
        k = tokens_bk.shape[1]
        slots_bk = cache.length_b[:, None] + jnp.arange(k, dtype=jnp.int32)
        sin, cos = rope_tables(slots_bk - cache.start_b[:, None], cfg)
        keys_s = jnp.arange(cache.k.shape[2], dtype=jnp.int32)
        old_bs = (keys_s[None, :] >= cache.start_b[:, None]) & (keys_s[None, :] < cache.length_b[:, None])
        new_bqk = (jnp.tril(jnp.ones((k, k), bool))[None]
                   & (slots_bk >= cache.start_b[:, None])[:, None, :])
        x = jnp.take(self.wte[...], tokens_bk, axis=0).astype(jnp.dtype(cfg.dtype))
        x = constrain(x, ("batch", "length", "act_embed"))
        stacked = {name: self.layers[name][...] for name in BLOCK_AXES}

        def layer(x_bkd, w_and_index):
            w, i = w_and_index
            q, k_new, v_new = _qkv(cfg, w, x_bkd, sin, cos)
            attn = cached_attention(q, cache.k[:, i], cache.v[:, i], old_bs, k_new, v_new, new_bqk)
            return _block_rest(cfg, w, x_bkd, attn), (k_new, v_new)

        x, (k_new, v_new) = jax.lax.scan(layer, x, (stacked, jnp.arange(cfg.n_layers)))
        hidden = rms_norm(x if all_logits else x[:, -1:], self.ln_f[...], cfg.rms_norm_eps)
        cache = KVCache(_write_slots(cache.k, k_new, cache.length_b),
                        _write_slots(cache.v, v_new, cache.length_b), cache.start_b,
                        cache.length_b + k)
        return self._logits(hidden), cache

    def _run_layers(self, x_bld, sin_bld, cos_bld, mask_bqk) -> jax.Array:
        cfg = self.cfg
        stacked = {name: self.layers[name][...] for name in BLOCK_AXES}
        step = functools.partial(block_forward, cfg)
        if cfg.remat_policy != "none":
            # prevent_cse only matters outside scan (scan already keeps the recomputation apart).
            step = jax.checkpoint(step, policy=REMAT_POLICIES[cfg.remat_policy],
                                  prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            body = lambda x, w: (step(w, x, sin_bld, cos_bld, mask_bqk), None)
            return jax.lax.scan(body, x_bld, stacked)[0]
        for i in range(cfg.n_layers):
            x_bld = step({name: w[i] for name, w in stacked.items()}, x_bld, sin_bld, cos_bld, mask_bqk)
        return x_bld
