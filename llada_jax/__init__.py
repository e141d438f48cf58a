"""llada-jax: align LLaDA as a speculative-decoding drafter (JAX/Flax)."""

__version__ = "0.1.0"
