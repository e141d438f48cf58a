"""Tiny CPU config: a 2-layer LLaDA-shaped student, well under a second per step on 2 cores.

The model's vocabulary comes from the dataset's student tokenizer (`model.init = "random"`), or
the model is read from a params checkpoint made by `llada-jax import-hf` (`model.init = PATH`).
"""

import ml_collections

from llada_jax.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.model.init = "random"
    c.model.update(d_model=64, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=128,
                   rope_theta=10000.0, dtype="float32", remat_policy="none")
    c.data.update(seq_len=128, global_batch_size=8)
    c.loss.chunk_size = 64
    c.optim.update(lr=1e-3, warmup_steps=10)
    c.train.update(eval_every=50, eval_batches=4, checkpoint_every=50, keep_checkpoints=3)
    return c
