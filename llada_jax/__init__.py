"""llada-jax: align LLaDA as a speculative-decoding drafter (JAX/Flax).

    import llada_jax
    cfg, model = llada_jax.load_hf("LLaDA-8B-Instruct", compute_dtype="float32")
    logits = model(tokens)                      # [B, L, V] float32
    llada_jax.save_hf(model, "exported", source_hf_dir="LLaDA-8B-Instruct")
"""

__version__ = "0.1.0"

__all__ = ["load_hf", "save_hf", "load_model"]


def __getattr__(name):  # lazy: `import llada_jax` stays cheap for the CLI and data workers
    if name in ("load_hf", "save_hf"):
        from llada_jax.model import params

        return getattr(params, name)
    if name == "load_model":
        from llada_jax.checkpoints import load_model

        return load_model
    raise AttributeError(f"module 'llada_jax' has no attribute {name!r}")
