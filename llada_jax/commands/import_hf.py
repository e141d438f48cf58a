"""`llada-jax import-hf`: an HF LLaDA or LLaMA dir (safetensors) -> a params checkpoint.

config.json's model_type picks the format: "llada" (LLaDAModelLM) or "llama" (LlamaForCausalLM,
e.g. a LLaMA-3 teacher: imported causal, with its RoPE scaling). The checkpoint is orbax params
plus config.json.

    llada-jax import-hf --hf-dir LLaDA-8B-Instruct --out ckpt/llada8b [--dtype float32]
                        [--compute-dtype float32] [--mesh fsdp=4,tensor=2]

--dtype is the params' dtype; --compute-dtype the activations' that `load_model` of the
checkpoint runs in (default ModelConfig's, bfloat16; float32 for logits that match
transformers' fp32 ones to 1e-5). Training and generate-teacher set their own.

With --mesh each parameter is placed with its sharding while it is read (one at a time), so a
model larger than one device fits; without it, params go to the default device.
"""

from __future__ import annotations

import argparse

from llada_jax import sharding
from llada_jax.checkpoints import save_params
from llada_jax.model.config import ModelConfig
from llada_jax.model.params import DTYPES, load_hf


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-dir", required=True, help="HF model dir: config.json + *.safetensors")
    parser.add_argument("--out", required=True, help="new checkpoint directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="param dtype (default: the safetensors' own)")
    parser.add_argument("--compute-dtype", choices=sorted(DTYPES), default=None,
                        help="activation dtype recorded for load_model (default: "
                             f"{ModelConfig.dtype}, ModelConfig's)")
    parser.add_argument("--mesh", default=None,
                        help="device mesh, e.g. fsdp=4,tensor=2 (axes data, fsdp, tensor)")


def run(args: argparse.Namespace) -> int:
    mesh = sharding.make_mesh(sharding.parse_mesh_spec(args.mesh)) if args.mesh else None
    cfg, model = load_hf(args.hf_dir, mesh=mesh, dtype=args.dtype,
                         compute_dtype=args.compute_dtype)
    path = save_params(args.out, model)
    print(f"imported {cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.embedding_size}, "
          f"params {cfg.param_dtype}, compute {cfg.dtype} -> {path}")
    return 0
