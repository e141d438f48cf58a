"""LLaDA's config class for transformers (trust_remote_code), shipped with every llada-jax export.

Written for llada-jax from the LLaDA architecture (llada_jax/model/config.py reads and writes the
same config.json fields); it does not need the original model's remote code. Only the fields the
forward pass uses have defaults here; every other config.json field is kept as an attribute.
"""

from transformers import PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"

    def __init__(self, d_model: int = 4096, n_heads: int = 32, n_kv_heads: int | None = None,
                 n_layers: int = 32, mlp_hidden_size: int = 12288, vocab_size: int = 126464,
                 embedding_size: int | None = None, rope_theta: float = 500000.0,
                 rms_norm_eps: float = 1e-5, max_sequence_length: int = 4096,
                 weight_tying: bool = False, mask_token_id: int = 126336, **kwargs):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.n_layers = n_layers
        self.mlp_hidden_size = mlp_hidden_size
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size or vocab_size
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.max_sequence_length = max_sequence_length
        self.weight_tying = weight_tying
        self.mask_token_id = mask_token_id
        # The LM head is wte itself when weight_tying (no separate tensor to tie).
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    @property
    def causal(self) -> bool:
        """llada-jax also exports causal models (a LLaMA-style teacher): config llada_jax.causal."""
        return bool((getattr(self, "llada_jax", None) or {}).get("causal", False))
