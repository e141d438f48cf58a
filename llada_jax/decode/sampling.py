"""Next-token sampling from logits on device (teacher generation; the engine's bonus tokens)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_next(logits_bv: jax.Array, key: jax.Array, temperature: float,
                top_p: float) -> jax.Array:
    """int32 [B]: argmax (temperature 0), else a draw from the tempered top-p nucleus."""
    if temperature == 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    scaled = logits_bv / temperature
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # Keep a token while the mass strictly before it is < top_p (the first one always stays).
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
