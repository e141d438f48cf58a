"""TPU splash attention (a Pallas kernel) for packed, bidirectional or causal, GQA attention.

`attention_impl = "splash"` makes the model call `splash_attention(q, k, v, mask)` with a
`SegmentMask` (segment ids + causal flag) instead of the dense [B, L, L] mask the XLA paths take:
the kernel builds the block-diagonal mask itself and skips the blocks it hides.

    mask = segment_mask(tokens_bl, segment_ids_bl, attention_mask_bl, causal=False)
    out_blnh = splash_attention(q_blnh, k_blkh, v_blkh, mask)

Under a mesh (`jax.set_mesh`) the kernel runs per device through `shard_map` over the batch and
head axes that the sharding rules give the activations. On TPU (including an ahead-of-time
compile for a TPU topology on a CPU machine) the Mosaic kernel is lowered; on any other platform
the same kernel runs in Pallas interpret mode (slow; for tests and CPU debugging).

Padding (segment 0) differs from the XLA reference only at padding queries: here they attend to
other padding positions, there to nothing. No real query ever sees a padding key in either.
On TPU, lower it under the default matmul precision: Mosaic rejects bf16 matmuls at "highest".
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
from flax.core import spmd as flax_spmd
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from llada_jax import sharding

# Query/key tile. 512 is what MaxText uses for long sequences on v5e/v5p; shorter sequences use
# one tile. Sequences must be a multiple of the TPU lane width.
MAX_BLOCK = 512
LANES = 128


@flax.struct.dataclass
class SegmentMask:
    """What splash needs to know about visibility; `causal` is static (part of the treedef)."""

    segment_ids_bl: jax.Array                          # int32 [B, L]; 0 = padding
    causal: bool = flax.struct.field(pytree_node=False)


def segment_mask(tokens_bl: jax.Array, segment_ids_bl: jax.Array | None,
                 attention_mask_bl: jax.Array | None, causal: bool) -> SegmentMask:
    """The model's mask inputs (see modeling.visibility_mask) as segment ids for splash.

    No segment ids means one segment per row; attention_mask 0 moves a position to segment 0.
    """
    seg = (jnp.ones(tokens_bl.shape, jnp.int32) if segment_ids_bl is None
           else segment_ids_bl.astype(jnp.int32))
    if attention_mask_bl is not None:
        seg = jnp.where(attention_mask_bl.astype(bool), seg, 0)
    return SegmentMask(seg, causal)


def block_sizes(seq_len: int) -> splash.BlockSizes:
    """Forward and backward tiles for a sequence of `seq_len` (a multiple of 128)."""
    if seq_len % LANES:
        raise ValueError(f"splash attention needs the sequence length to be a multiple of {LANES}; "
                         f"got {seq_len}: set data.seq_len to a multiple of {LANES} or use "
                         f"model.attention_impl='xla'")
    block = next(b for b in (MAX_BLOCK, 256, LANES) if seq_len % b == 0)
    return splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                             block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                             block_q_dq=block, block_kv_dq=block)


def _kernel(n_heads: int, seq_len: int, causal: bool, interpret: bool):
    """The kernel for one device's [n_heads, L, hd] queries.

    Built per trace, not cached: it holds arrays that are created inside the trace."""
    shape = (seq_len, seq_len)
    head_mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
    return splash.make_splash_mha(splash.MultiHeadMask([head_mask] * n_heads),
                                  block_sizes=block_sizes(seq_len), head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def _local_attention(q_blnh, k_blkh, v_blkh, seg_bl, *, causal: bool):
    """One device's shard: [b, L, n, hd] queries, [b, L, k, hd] keys/values (n % k == 0)."""
    _, seq_len, n_heads, head_dim = q_blnh.shape
    q_bnlh = jnp.swapaxes(q_blnh * jnp.asarray(head_dim ** -0.5, q_blnh.dtype), 1, 2)
    k_bklh, v_bklh = jnp.swapaxes(k_blkh, 1, 2), jnp.swapaxes(v_blkh, 1, 2)

    def run(interpret: bool):
        kernel = _kernel(n_heads, seq_len, causal, interpret)
        return lambda q, k, v, s: jax.vmap(kernel)(q, k, v, splash.SegmentIds(s, s))

    # Picked when lowering: the Mosaic kernel for TPU, interpret mode anywhere else.
    out_bnlh = jax.lax.platform_dependent(q_bnlh, k_bklh, v_bklh, seg_bl,
                                          tpu=run(False), default=run(True))
    return jnp.swapaxes(out_bnlh, 1, 2)


def splash_attention(q_blnh: jax.Array, k_blkh: jax.Array, v_blkh: jax.Array,
                     mask: SegmentMask) -> jax.Array:
    """Attention softmax(q k^T / sqrt(hd)) v over `mask`; [B, L, N, hd] out, dtype of q.

    GQA: query head h uses KV head h // (N / K). When the rules shard query heads over a mesh
    axis that does not divide the KV heads, K/V are repeated to N heads first so that every
    device holds the KV heads of its own query heads.
    """
    local = functools.partial(_local_attention, causal=mask.causal)
    seg_bl = mask.segment_ids_bl
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q_blnh, k_blkh, v_blkh, seg_bl)
    rules = flax_spmd.get_logical_axis_rules() or sharding.DEFAULT_RULES
    spec = lambda x, names: sharding.spec_for(x.shape, names, mesh, rules, strict=False)
    # The kernel needs whole sequences on each device: the length axis is never split here.
    q_spec = spec(q_blnh, ("batch", None, "act_heads", "head_dim"))
    kv_spec = spec(k_blkh, ("batch", None, "act_kv_heads", "head_dim"))
    if q_spec[2] is not None and kv_spec[2] != q_spec[2]:
        group = q_blnh.shape[2] // k_blkh.shape[2]
        k_blkh, v_blkh = (jnp.repeat(x, group, axis=2) for x in (k_blkh, v_blkh))
        kv_spec = q_spec
    seg_spec = PartitionSpec(q_spec[0], None)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                         out_specs=q_spec, check_vma=False)(q_blnh, k_blkh, v_blkh, seg_bl)
