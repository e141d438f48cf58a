"""`llada-jax export-hf`: a params checkpoint -> an HF dir the original PyTorch code loads.

A LLaDA checkpoint is written for LLaDAModelLM, an imported LLaMA one for LlamaForCausalLM.

    llada-jax export-hf --ckpt ckpt/llada8b --out exported --source-hf-dir LLaDA-8B-Instruct
                        [--dtype bfloat16] [--max-shard-size 5GB]
    llada-jax export-hf --ckpt runs/llada8b [--step 1200] --out exported ...

--ckpt is a params checkpoint (`import-hf`), a train workdir (its latest checkpoint, or --step)
or one of its step dirs (`runs/llada8b/checkpoints/1200`).

Writes sharded safetensors + model.safetensors.index.json + config.json, and copies the
tokenizer, remote code (*.py) and other non-weight files of --source-hf-dir; the project's own
remote code fills in what the source lacks, so that
`AutoModel.from_pretrained(out, trust_remote_code=True)` works. The drafter's serving contract
(drafter_contract.json, which `train` writes into its workdir) comes along when --ckpt has one.
"""

from __future__ import annotations

import argparse
import sys

from llada_jax import drafter_contract
from llada_jax.checkpoints import load_model
from llada_jax.model.params import DTYPES, parse_size, save_hf


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True,
                        help="params checkpoint (import-hf), train workdir or its step dir")
    parser.add_argument("--step", type=int, default=None,
                        help="with a train workdir: this step's checkpoint (default: the latest)")
    parser.add_argument("--out", required=True, help="new HF model directory")
    parser.add_argument("--source-hf-dir", default=None,
                        help="HF dir to copy tokenizer and remote-code files from")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="tensor dtype (default: the checkpoint's param dtype)")
    parser.add_argument("--max-shard-size", default="5GB", help="per safetensors file, e.g. 5GB")


def run(args: argparse.Namespace) -> int:
    max_shard_bytes = parse_size(args.max_shard_size)  # flags first, then the checkpoint
    _, model = load_model(args.ckpt, step=args.step)
    files = save_hf(model, args.out, source_hf_dir=args.source_hf_dir, dtype=args.dtype,
                    max_shard_bytes=max_shard_bytes)
    print(f"wrote {len(files)} safetensors file(s) + config.json to {args.out}")
    record = drafter_contract.find(args.ckpt)
    if record is not None:  # speculate's defaults and checks travel with the weights
        print(f"  + {drafter_contract.write(args.out, record).name}: γ {record.gamma}, "
              f"trailing masks {record.trailing_masks}, steps {record.steps}")
    if args.source_hf_dir is None:
        print("note: no --source-hf-dir, so no tokenizer files were copied (the model's remote "
              "code was: it loads with trust_remote_code=True); pass the tokenizer's directory "
              "as --source-hf-dir for AutoTokenizer.from_pretrained(out)", file=sys.stderr)
    return 0
