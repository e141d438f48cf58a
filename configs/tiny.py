"""Tiny CPU config: a 2-layer LLaDA-shaped student, well under a second per step on 2 cores.

The model's vocabulary comes from the dataset's student tokenizer (`model.init = "random"`), or
the model is read from a params checkpoint made by `llada-jax import-hf` (`model.init = PATH`).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.init = "random"          # "random" or a params checkpoint dir from `import-hf`
    c.model.init_seed = 0
    c.model.mask_token = ""          # "" = the student tokenizer's <|mdm_mask|> / <|mask|> / ...
    c.model.d_model = 64
    c.model.n_heads = 4
    c.model.n_kv_heads = 4
    c.model.n_layers = 2
    c.model.mlp_hidden_size = 128
    c.model.rope_theta = 10000.0
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"          # compute dtype; bf16 on accelerators
    c.model.scan_layers = True
    c.model.remat_policy = "none"
    c.model.attention_impl = "xla"

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""                    # a `llada-jax preprocess` output dir (required)
    c.data.seq_len = 128
    c.data.global_batch_size = 8
    c.data.seed = 0
    c.data.pack = True
    c.data.num_shards = 0              # data shards (0: one per process); keep it to resume
    c.data.eval_split = "validation"

    c.loss = ml_collections.ConfigDict()
    c.loss.kind = "kl"                 # kl | reverse_kl | jsd | tvd
    c.loss.temperature = 1.0
    c.loss.chunk_size = 64             # sequence positions per LM-head chunk
    c.loss.mask_mode = "original"      # original | masked_only | full | prefix_block
    c.loss.mask_eps = 1e-3

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.final_lr_fraction = 0.0
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.max_grad_norm = 1.0
    c.optim.grad_accum_steps = 1

    c.train = ml_collections.ConfigDict()
    c.train.seed = 0
    c.train.num_epochs = 3
    c.train.num_steps = 0              # 0: derived from num_epochs and the dataset size
    c.train.log_every = 10
    c.train.eval_every = 50
    c.train.eval_batches = 4
    c.train.checkpoint_every = 50
    c.train.keep_checkpoints = 3
    c.train.async_checkpointing = True

    c.eval = ml_collections.ConfigDict()
    c.eval.gammas = (4, 8)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                   # -1: every device not used by fsdp/tensor
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    return c
