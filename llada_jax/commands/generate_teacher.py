"""`llada-jax generate-teacher`: a causal LLaMA-style teacher continues prompts, its
distributions recorded in the seed format (`--out`, teacher/generate.py) or straight into the
training dataset (`--records`, teacher/to_records.py).

    llada-jax generate-teacher --teacher CKPT --tokenizer TOK_DIR --prompts prompts.txt \\
        --out teacher.jsonl [--max-new-tokens 64] [--greedy | --temperature 0.8 --top-p 0.95] \\
        [--full-logits] [--batch-size 8] [--chat-template]
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from data_pipeline.convert import Options
from data_pipeline.preprocess import report_dir
from data_pipeline.report import human_summary
from llada_jax import sharding
from llada_jax.commands.train import add_distributed_arguments, initialize_distributed
from llada_jax.errors import GenerateError, UserError
from llada_jax.model import params
from llada_jax.teacher import hosts
from llada_jax.teacher.generate import Sampling, generate_teacher, load_teacher
from llada_jax.teacher.prompts import nonempty, read_prompts
from llada_jax.teacher.to_records import write_teacher_dataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True,
                        help="causal params checkpoint, or an HF LLaMA dir (config.json + safetensors)")
    parser.add_argument("--tokenizer", default=None,
                        help="teacher tokenizer directory (HF; default: the --teacher HF dir)")
    parser.add_argument("--dtype", choices=sorted(params.DTYPES), default="float32",
                        help="params and compute dtype (bfloat16 for a large teacher)")
    parser.add_argument("--mesh", default=None,
                        help="device mesh, e.g. tensor=8 (rows over data, heads over tensor)")
    parser.add_argument("--prompts", required=True, nargs="+",
                        help="text (one prompt a line), .jsonl or .json with \"prompt\" fields")
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="output .jsonl or .json (seed format)")
    out.add_argument("--records", metavar="DATA_DIR",
                     help="write the training dataset (as preprocess does) instead of JSON")
    parser.add_argument("--student-tokenizer", help="--records: the student tokenizer (as preprocess)")
    parser.add_argument("--top-k", type=int, default=64, help="--records: teacher log-probs kept")
    parser.add_argument("--record-format", type=int, choices=(1, 2), default=2,
                        help="--records: 2 (default) quantised log-probs, 1 float32 (as preprocess)")
    parser.add_argument("--max-length", type=int, default=4096,
                        help="--records: max student tokens per example")
    parser.add_argument("--validation-fraction", type=float, default=0.05)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out file, or rebuild --records DATA_DIR")
    add_distributed_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    parser.add_argument("--temperature", type=float, default=0.0, help="> 0: sample")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-logits", action="store_true",
                        help="also write every logit (vocab_size floats per response token)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chat-template", action="store_true",
                        help="wrap each prompt in the tokenizer's chat template as a user turn")


def run(args: argparse.Namespace) -> int:
    problems = []
    if args.greedy and args.temperature > 0:
        problems.append("--greedy and --temperature > 0 contradict each other; pick one")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        problems.append("need --temperature >= 0 and 0 < --top-p <= 1")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        problems.append("need --max-new-tokens >= 1 and --batch-size >= 1")
    if args.records and not args.student_tokenizer:
        problems.append("--records needs --student-tokenizer (the tokenizer the dataset is for)")
    if problems:
        raise GenerateError("; ".join(problems))
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    initialize_distributed(args)  # before the mesh: it spans every process's devices
    mesh = sharding.make_mesh(sharding.parse_mesh_spec(args.mesh)) if args.mesh else None
    if args.records:
        return run_records(args, sampling, mesh)
    if jax.process_index() == 0:
        print(f"generate-teacher: loading {args.teacher}, then up to {args.max_new_tokens} "
              f"tokens per prompt -> {args.out}", file=sys.stderr, flush=True)
    count = generate_teacher(args.teacher, args.tokenizer, args.prompts, args.out, sampling,
                             dtype=args.dtype, mesh=mesh, batch_size=args.batch_size,
                             full_logits=args.full_logits, chat_template=args.chat_template,
                             overwrite=args.overwrite)
    if jax.process_index() == 0:
        print(f"generate-teacher: wrote {count} records to {args.out}")
    return 0


def run_records(args, sampling: Sampling, mesh) -> int:
    """generate-teacher --records (`run` has started the processes and made the mesh)."""
    prompts = nonempty(read_prompts(args.prompts), args.prompts)  # before the teacher loads
    model, tokenizer = load_teacher(args.teacher, args.tokenizer, args.dtype, mesh)
    if jax.process_count() > 1:
        print(hosts.describe_share(model))
    teacher_tokenizer = args.tokenizer or args.teacher
    opts = Options(args.student_tokenizer, str(teacher_tokenizer), args.max_length, args.top_k,
                   model.cfg.vocab_size, validation_fraction=args.validation_fraction,
                   record_format=args.record_format)
    try:
        report = write_teacher_dataset(
                model, tokenizer, prompts, args.records, opts, sampling,
                batch_size=args.batch_size, overwrite=args.overwrite,
                chat_template=args.chat_template, mesh=mesh)
    except UserError:
        raise
    except ValueError as e:  # the tokenizer libraries' own errors
        raise GenerateError(str(e)) from None
    if report is None:
        return 0
    print(json.dumps({k: report[k] for k in ("read", "written", "skipped", "coverage",
                                             "bytes_per_response_token") if k in report}, indent=2))
    print(human_summary(report, report_dir(args.records, report)), file=sys.stderr)
    if args.validation_fraction and report["written"] and \
            not report["written_per_split"].get("validation"):
        print(f"generate-teacher: no example landed in the validation split (--validation-"
              f"fraction {args.validation_fraction} of {report['written']}); give more prompts "
              f"or a larger fraction for a held-out eval", file=sys.stderr)
    return 0 if report["written"] else 1
