"""LLaDA for PyTorch / transformers (trust_remote_code), shipped with every llada-jax export.

Written for llada-jax from the architecture of its JAX model (llada_jax/model/modeling.py in the
llada-jax sources): pre-norm blocks with
bidirectional multi-head attention (grouped key/value heads), half-split RoPE on absolute
positions, RMSNorm computed in fp32, a SwiGLU MLP, and an LM head that is `ff_out` or, with
weight_tying, the embedding matrix. Module names give the published state-dict keys
(model.transformer.wte / blocks.{i}.{q,k,v}_proj, attn_out, ff_proj, up_proj, ff_out,
attn_norm, ff_norm / ln_f / ff_out). Logits cover the embedding rows (embedding_size).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_llada import LLaDAConfig


class RMSNorm(nn.Module):
    """x / rms(x) in fp32, back to x's dtype, then times the weight."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        scale = torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + self.eps)
        return (x32 * scale).to(x.dtype) * self.weight.to(x.dtype)


def rotary(x_bhld: torch.Tensor, angles_ld: torch.Tensor) -> torch.Tensor:
    """x cos + cat(-x2, x1) sin with the angles of every (position, frequency), in fp32."""
    x = x_bhld.float()
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * angles_ld.cos() + turned * angles_ld.sin()).to(x_bhld.dtype)


class LLaDABlock(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        d, head_dim = cfg.d_model, cfg.d_model // cfg.n_heads
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, head_dim
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, cfg.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * head_dim, bias=False)
        self.attn_out = nn.Linear(cfg.n_heads * head_dim, d, bias=False)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=False)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, l, _ = x.shape
        return x.view(b, l, n, self.head_dim).transpose(1, 2)  # [B, heads, L, hd]

    def forward(self, x: torch.Tensor, angles: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(x)
        q = rotary(self._heads(self.q_proj(h), self.n_heads), angles)
        k = rotary(self._heads(self.k_proj(h), self.n_kv_heads), angles)
        v = self._heads(self.v_proj(h), self.n_kv_heads)
        group = self.n_heads // self.n_kv_heads  # query head j reads key/value head j // group
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
        weights = torch.softmax(scores + bias, dim=-1).to(v.dtype)
        attended = torch.matmul(weights, v).transpose(1, 2).flatten(2)
        x = x + self.attn_out(attended)
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDATransformer(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.cfg = cfg
        parts = {"wte": nn.Embedding(cfg.embedding_size, cfg.d_model),
                 "blocks": nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.n_layers)),
                 "ln_f": RMSNorm(cfg.d_model, cfg.rms_norm_eps)}
        if not cfg.weight_tying:
            parts["ff_out"] = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)
        self.transformer = nn.ModuleDict(parts)

    def _attention_bias(self, attention_mask: torch.Tensor | None, b: int, l: int,
                        device) -> torch.Tensor:
        """[B or 1, 1, L, L] float32: 0 where a query may see a key, a large negative where the
        key is padding (attention_mask 0) or, for a causal export, in the future. Finite, so a
        query with no visible key averages instead of giving NaN."""
        allowed = torch.ones(1, 1, l, l, dtype=torch.bool, device=device)
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        if self.cfg.causal:
            allowed = allowed & torch.ones(l, l, dtype=torch.bool, device=device).tril()
        return torch.zeros(allowed.shape, device=device).masked_fill(
            ~allowed, torch.finfo(torch.float32).min)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        b, l = input_ids.shape
        head_dim = self.cfg.d_model // self.cfg.n_heads
        inv_freq = 1.0 / self.cfg.rope_theta ** (
            torch.arange(0, head_dim, 2, dtype=torch.float32, device=input_ids.device) / head_dim)
        freqs = torch.arange(l, dtype=torch.float32, device=input_ids.device)[:, None] * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)  # [L, hd]
        bias = self._attention_bias(attention_mask, b, l, input_ids.device)
        x = self.transformer.wte(input_ids)
        for block in self.transformer.blocks:
            x = block(x, angles, bias)
        x = self.transformer.ln_f(x)
        if self.cfg.weight_tying:
            return F.linear(x, self.transformer.wte.weight)
        return self.transformer.ff_out(x)


class LLaDAModelLM(PreTrainedModel):
    """transformers entry point (AutoModel / AutoModelForCausalLM): logits of every position."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDABlock"]

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDATransformer(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        """input_ids [B, L] -> logits float [B, L, embedding_size]; attention_mask [B, L]:
        1 = real token, 0 = padding key (hidden from every query)."""
        del kwargs  # generation arguments (use_cache, ...) have no meaning for this model
        logits = self.model(input_ids, attention_mask)
        out = CausalLMOutputWithPast(logits=logits)
        return out if return_dict is not False else (logits,)
