"""An independent PyTorch LLaDA forward for the tests, written from DESIGN.md's description.

It reads an HF-layout state dict (`model.transformer.*`, torch Linear weights [out, in]) and an
HF config dict, and deliberately does things the other way round from llada_jax.model.modeling: heads
repeated for GQA (repeat_interleave) instead of grouped, an additive -inf bias via torch's SDPA,
RoPE tables built per position with torch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PREFIX = "model.transformer."


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def rope(x_bnlh: torch.Tensor, positions_bl: torch.Tensor, theta: float) -> torch.Tensor:
    head_dim = x_bnlh.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = positions_bl.float()[:, None, :, None] * inv_freq  # [B, 1, L, hd/2]
    angles = torch.cat([angles, angles], dim=-1)
    x = x_bnlh.float()
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * angles.cos() + rotated * angles.sin()).to(x_bnlh.dtype)


def forward(state: dict[str, torch.Tensor], cfg: dict, tokens_bl: torch.Tensor,
            positions_bl: torch.Tensor | None = None, key_mask_bl: torch.Tensor | None = None,
            causal: bool = False) -> torch.Tensor:
    """tokens [B, L] -> logits [B, L, V]. key_mask_bl: bool, False = padding key (hidden)."""
    batch, length = tokens_bl.shape
    n_heads = cfg["n_heads"]
    n_kv = cfg.get("n_kv_heads") or n_heads
    head_dim = cfg["d_model"] // n_heads
    eps = cfg["rms_norm_eps"]
    if positions_bl is None:
        positions_bl = torch.arange(length).expand(batch, length)
    allowed = torch.ones(batch, 1, length, length, dtype=torch.bool)
    if key_mask_bl is not None:
        allowed = allowed & key_mask_bl[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool).tril()
    bias = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))

    x = state[PREFIX + "wte.weight"][tokens_bl]
    for i in range(cfg["n_layers"]):
        p = lambda name: state[f"{PREFIX}blocks.{i}.{name}.weight"]
        h = rms_norm(x, p("attn_norm"), eps)
        q = (h @ p("q_proj").T).view(batch, length, n_heads, head_dim).transpose(1, 2)
        k = (h @ p("k_proj").T).view(batch, length, n_kv, head_dim).transpose(1, 2)
        v = (h @ p("v_proj").T).view(batch, length, n_kv, head_dim).transpose(1, 2)
        q, k = rope(q, positions_bl, cfg["rope_theta"]), rope(k, positions_bl, cfg["rope_theta"])
        k = k.repeat_interleave(n_heads // n_kv, dim=1)
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x + att.transpose(1, 2).reshape(batch, length, -1) @ p("attn_out").T
        h = rms_norm(x, p("ff_norm"), eps)
        x = x + (F.silu(h @ p("ff_proj").T) * (h @ p("up_proj").T)) @ p("ff_out").T
    x = rms_norm(x, state[PREFIX + "ln_f.weight"], eps)
    head = state[PREFIX + "wte.weight"] if cfg.get("weight_tying") else state[PREFIX + "ff_out.weight"]
    return x @ head.T
