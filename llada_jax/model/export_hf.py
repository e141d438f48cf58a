"""`llada-jax export-hf`: a params checkpoint -> an HF dir the original PyTorch code loads.

A LLaDA checkpoint is written for LLaDAModelLM, an imported LLaMA one for LlamaForCausalLM.

    llada-jax export-hf --ckpt ckpt/llada8b --out exported --source-hf-dir LLaDA-8B-Instruct
                        [--dtype bfloat16] [--max-shard-size 5GB]

Writes sharded safetensors + model.safetensors.index.json + config.json, and copies the
tokenizer, remote code (*.py) and other non-weight files of --source-hf-dir, so that
`AutoModel.from_pretrained(out, trust_remote_code=True)` works.
"""

from __future__ import annotations

import argparse
import sys

from llada_jax.checkpoints import CheckpointError, load_params
from llada_jax.model.config import ConfigError
from llada_jax.model.params import DTYPES, ConversionError, parse_size, save_hf


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="params checkpoint (from import-hf or train)")
    parser.add_argument("--out", required=True, help="new HF model directory")
    parser.add_argument("--source-hf-dir", default=None,
                        help="HF dir to copy tokenizer and remote-code files from")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="tensor dtype (default: the checkpoint's param dtype)")
    parser.add_argument("--max-shard-size", default="5GB", help="per safetensors file, e.g. 5GB")


def run(args: argparse.Namespace) -> int:
    try:
        _, model = load_params(args.ckpt)
        files = save_hf(model, args.out, source_hf_dir=args.source_hf_dir, dtype=args.dtype,
                        max_shard_bytes=parse_size(args.max_shard_size))
    except (ConfigError, ConversionError, CheckpointError) as err:
        print(f"llada-jax export-hf: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(files)} safetensors file(s) + config.json to {args.out}")
    if args.source_hf_dir is None:
        print("note: no --source-hf-dir, so no tokenizer or remote-code files were copied; "
              "AutoModel.from_pretrained(..., trust_remote_code=True) needs them", file=sys.stderr)
    return 0
