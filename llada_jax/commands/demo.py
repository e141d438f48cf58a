"""`llada-jax demo`: the whole flow, end to end, on the built-in tiny default.

1. A tiny LLaMA-style causal teacher (pre-trained on a public-domain corpus, shipped in
   `demo_assets/`, made by `scripts/make_demo_assets.py`) answers prompts; its distributions are
   written in the seed format (`generate-teacher`).
2. `preprocess` maps them onto a DIFFERENT student tokenizer (vocabulary by token string,
   positions by character offsets) and stores top-k targets.
3. A LLaDA student is aligned with the KL train step (`train`), evaluated before and after
   under the drafting condition (`eval`), and exported to HF format (`export-hf`).
4. Before and after, it drafts for the teacher on held-out prompts (`speculate`, TLI, γ = 4):
   the MEASURED tokens per target call, greedy and sampled, beside the α-predicted E(γ), and
   the MEASURED wall clock against the teacher alone (same run, same cached verifier).
It prints a before/after table and writes `curves.png` (loss and acceptance α per step).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import shutil
import sys
import time

from llada_jax import reports
from llada_jax.errors import UserError
from llada_jax.train.recipes import BASELINE, PER_STEPS, RECIPES

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "demo_assets"
STRATEGIES = ("original", "masked_only", "prefix_block")
SEEDS = 3  # --compare-strategies: seeds of the top rows
SEQ_LEN, EVAL_BATCH = 96, 16  # rows of the training and held-out batches
# --quick: (max prompts, answer tokens, steps) of a smoke run that still shows the KL fall.
QUICK = (64, 12, 30)
SPEC_PROMPTS, SPEC_NEW_TOKENS, SPEC_GAMMA = 24, 16, 4  # the speculative measurement, kept short
# --compare-strategies ranks recipes on the first SPEC_PROMPTS held-out prompts and checks the
# ranking on the next CONFIRM_PROMPTS, which choose nothing.
CONFIRM_PROMPTS = 48


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="where everything is written")
    parser.add_argument("--steps", type=int, default=200, help="student training steps")
    parser.add_argument("--mask-mode", default=None, choices=STRATEGIES + ("full", "draft_blocks"),
                        help="loss positions (default: the config's recommended default)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="teacher answer length")
    parser.add_argument("--top-k", type=int, default=32, help="teacher targets kept per token")
    parser.add_argument("--max-prompts", type=int, default=None,
                        help="use only the first N prompts (a quicker, smaller run)")
    parser.add_argument("--student", choices=("pretrained", "random"), default="random",
                        help="start from the shipped pre-trained tiny LLaDA, or from scratch")
    parser.add_argument("--compare-strategies", action="store_true",
                        help="train once per recipe (loss kind, position weights, mask mode, "
                             "TLI intersection) and rank them by measured tokens per target call "
                             f"on {SPEC_PROMPTS} held-out prompts, checked on the next "
                             f"{CONFIRM_PROMPTS}")
    parser.add_argument("--rows", default=",".join(RECIPES),
                        help=f"--compare-strategies: comma-separated recipes ({', '.join(RECIPES)})")
    parser.add_argument("--seeds", type=int, default=SEEDS,
                        help="--compare-strategies: seeds for the top rows (seed 0 for the rest)")
    parser.add_argument("--top", type=int, default=2,
                        help="--compare-strategies: how many of the best rows get all the seeds "
                             "(and original+kl, the baseline, when it is a row)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a short smoke run: --max-prompts {QUICK[0]} --max-new-tokens "
                             f"{QUICK[1]} --steps {QUICK[2]}")


def run(args: argparse.Namespace) -> int:
    from llada_jax.train import config as train_config

    if args.quick:
        args.max_prompts, args.max_new_tokens, args.steps = QUICK
    check_arguments(args)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data_dir = make_teacher_data(out, args.max_new_tokens, args.top_k, args.max_prompts)
    if args.compare_strategies:
        rows = compare_recipes(args, data_dir, out)
        print(recipe_table(rows))
        (out / "strategies.json").write_text(json.dumps(rows, indent=2) + "\n")
        return 0
    overrides = demo_overrides(data_dir, args.steps, args.mask_mode, args.student)
    config = train_config.load_config("tiny", overrides)
    workdir = out / "run"
    results = {config.loss.mask_mode: align_student(config, workdir)}
    (mode, result), = results.items()
    export_dir = export(workdir, out / "exported")
    reports.plot_curves(workdir / "metrics.jsonl", out / "curves.png")
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(before_after_table(result))
    print(f"\nmask mode {mode}; curves: {out / 'curves.png'}; total "
          f"{time.perf_counter() - start:.0f} s. The same held-out numbers from the exported model:"
          f"\n  llada-jax eval --ckpt {export_dir} --data {data_dir} --gamma 4 "
          f"--batch-size {EVAL_BATCH} --seq-len {SEQ_LEN}")
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    small = [f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})"
             for name in ("steps", "max_new_tokens", "top_k", "max_prompts")
             if getattr(args, name) is not None and getattr(args, name) < 1]
    if pathlib.Path(args.out).is_file():
        small.append(f"--out {args.out} is a file; pass a directory")
    if args.seeds < 1 or args.top < 0:
        small.append(f"need --seeds >= 1 and --top >= 0 (got {args.seeds}, {args.top})")
    if not args.compare_strategies and (args.rows != ",".join(RECIPES) or args.seeds != SEEDS):
        small.append("--rows and --seeds choose the runs of --compare-strategies; add that flag")
    unknown = [n for n in _row_names(args.rows) if n not in RECIPES]
    if unknown:  # before minutes of teacher and training work
        small.append(f"unknown --rows {unknown}: choose from {', '.join(RECIPES)}")
    if small:
        raise UserError("; ".join(small))


def _row_names(rows: str) -> list[str]:
    return [n.strip() for n in rows.split(",") if n.strip()]


def demo_overrides(data_dir: pathlib.Path, steps: int, mode: str | None,
                   student: str = "random") -> list[str]:
    """The tiny config, sized for the demo data."""
    # From scratch: the shipped student's shape, ~1/10 of the teacher's FLOPs per token
    # (scripts/make_demo_assets.py STUDENT_ARCH, bench/demo_pair_cost.py).
    init = (f"--config.model.init={ASSETS / 'student'}" if student == "pretrained" else
            "--config.model.d_model=64")
    overrides = [f"--config.data.dir={data_dir}", f"--config.data.seq_len={SEQ_LEN}",
                 f"--config.data.global_batch_size={EVAL_BATCH}", init,
                 "--config.model.n_layers=3", "--config.model.mlp_hidden_size=192",
                 f"--config.train.num_steps={steps}", "--config.train.num_epochs=1000",
                 f"--config.train.eval_every={max(steps // 6, 1)}", "--config.train.eval_batches=8",
                 f"--config.train.checkpoint_every={steps}", "--config.optim.lr=3e-3",
                 "--config.optim.warmup_steps=20", "--config.eval.gammas=(4,)"]
    return overrides + ([f"--config.loss.mask_mode={mode}"] if mode else [])


def make_teacher_data(out: pathlib.Path, max_new_tokens: int, top_k: int,
                      max_prompts: int | None = None) -> pathlib.Path:
    """Teacher answers with full-vocabulary logits -> the student's top-k records."""
    from data_pipeline.convert import Options
    from data_pipeline.preprocess import preprocess
    from llada_jax.teacher.generate import Sampling, generate_records, load_teacher, read_prompts
    from llada_jax.teacher.generate import write_records

    dump, done = out / "teacher.jsonl", out / "teacher.done"
    recipe = json.dumps({"max_new_tokens": max_new_tokens, "assets": str(ASSETS),
                         "max_prompts": max_prompts})
    fresh = not (done.is_file() and done.read_text() == recipe)
    if fresh:  # a rerun in the same --out reuses the teacher's answers
        done.unlink(missing_ok=True)
        t = time.perf_counter()
        _stage("[1/4] teacher: answering the demo prompts (full logits)...")
        teacher, tokenizer = load_teacher(ASSETS / "teacher", ASSETS / "teacher_tokenizer")
        prompts = itertools.islice(read_prompts([ASSETS / "prompts_train.txt",
                                                 ASSETS / "prompts_eval.txt"]), max_prompts)
        n = write_records(generate_records(teacher, tokenizer, prompts,
                                           Sampling(max_new_tokens=max_new_tokens), batch_size=64,
                                           full_logits=True), dump)
        done.write_text(recipe)
        print(f"[1/4] teacher: {n} answers with full logits -> {dump} "
              f"({dump.stat().st_size / 1e6:.0f} MB, {time.perf_counter() - t:.0f} s)")
    else:
        print(f"[1/4] teacher: reusing {dump}")
    t = time.perf_counter()
    data_dir = out / "data"
    report = preprocess([str(dump)], str(data_dir),
                        Options(str(ASSETS / "student_tokenizer"), str(ASSETS / "teacher_tokenizer"),
                                max_length=128, top_k=top_k, validation_fraction=0.2),
                        workers=os.cpu_count() or 1, overwrite=fresh)
    cov = report["coverage"]
    print(f"[2/4] preprocess: {report['written']}/{report['read']} examples "
          f"({report['written_per_split']}), vocab matched {cov['vocab_matched_pct']:.1f}%, "
          f"positions kept {cov['positions_kept_pct']:.1f}%, teacher mass kept "
          f"{cov['teacher_mass_kept_pct']:.1f}%, {report['bytes_per_response_token']} B/token "
          f"({time.perf_counter() - t:.0f} s)")
    return data_dir


def compare_recipes(args: argparse.Namespace, data_dir: pathlib.Path, out: pathlib.Path
                    ) -> dict:
    """Every recipe in --rows at seed 0, then seeds 1.. for the --top best and the baseline:
    {recipe: [after metrics per seed]}, same data and steps for all."""
    from llada_jax.train import config as train_config

    names = _row_names(args.rows)  # checked by check_arguments

    def train(name, seed):
        overrides = demo_overrides(data_dir, args.steps, None, args.student) + list(
            RECIPES[name]) + [f"--config.train.seed={seed}", f"--config.model.init_seed={seed}",
                              f"--config.onpolicy.seed={seed}",
                              f"--config.onpolicy.teacher={ASSETS / 'teacher'}"] + [
            f"--config.{field}={value(args.steps)}" for field, value in PER_STEPS.items()]
        config = train_config.load_config("tiny", overrides)
        after = align_student(config, out / f"run_{name}_s{seed}", before=False,
                              confirm=True)["after"]
        confirmed = (f" (confirmation prompts: {after['confirm_greedy']:.3f}, "
                     f"{after['confirm_sampled']:.3f})" if "confirm_greedy" in after else "")
        print(f"  {name} seed {seed}: measured greedy {after['measured_greedy']:.3f}, sampled "
              f"{after['measured_sampled']:.3f}{confirmed}", flush=True)
        return after

    rows = {name: [train(name, 0)] for name in names}
    top = sorted(rows, key=lambda n: -_measured(rows[n][0]))[:args.top]
    # The baseline (the shipped default) gets every seed too, when it is a row: the ratios need it.
    for name in top + [n for n in (BASELINE,) if n in rows and n not in top and args.top]:
        rows[name] += [train(name, seed) for seed in range(1, args.seeds)]
    return rows


def _measured(r: dict, prefix: str = "measured") -> float:
    """The ranking key: measured tokens per target call, greedy and sampled averaged (prefix
    "confirm": the same on the confirmation prompts)."""
    return 0.5 * (r[f"{prefix}_greedy"] + r[f"{prefix}_sampled"])


def align_student(config, workdir: pathlib.Path, before: bool = True, confirm: bool = False
                  ) -> dict:
    """Trains a fresh student; held-out drafter metrics of the initial (if `before`) and final
    params. `confirm`: the final params are also measured on the CONFIRM_PROMPTS held-out
    prompts after the first SPEC_PROMPTS (keys confirm_greedy / confirm_sampled)."""
    from flax import nnx

    from data_pipeline.loader import prompt_texts
    from llada_jax.checkpoints import load_model
    from llada_jax.train.trainer import Trainer

    shutil.rmtree(workdir, ignore_errors=True)
    trainer = Trainer(config, workdir, progress=sys.stderr.isatty())

    def held_out(state):
        return trainer.evaluate(state)["gamma=4"]

    def measured(state, prompts):
        model = nnx.merge(trainer.graphdef, state.params)
        return measure_speculative(model, teacher, prompts)

    t = time.perf_counter()
    teacher = load_model(ASSETS / "teacher", compute_dtype="float32", causal=True)[1]
    prompts = prompt_texts(config.data.dir, "validation", str(ASSETS / "student_tokenizer"),
                                   SPEC_PROMPTS + (CONFIRM_PROMPTS if confirm else 0))
    prompts, confirm_prompts = prompts[:SPEC_PROMPTS], prompts[SPEC_PROMPTS:]
    if before:
        _stage(f"[3/4] before training: held-out metrics, speculative decoding on "
               f"{len(prompts)} prompts (greedy, sampled) with the teacher-only baseline...")
    initial = (held_out(trainer.initial_state()) | measured(trainer.initial_state(), prompts)
               if before else {})
    if config.onpolicy.rounds:  # the same trainer settings, in on-policy rounds
        from llada_jax.onpolicy.rounds import run_rounds

        trainer = run_rounds(config, workdir / "onpolicy", progress=sys.stderr.isatty())
    else:
        trainer.fit()
    _stage("[3/4] after training: held-out metrics and speculative decoding again...")
    after = held_out(trainer.final_state) | measured(trainer.final_state, prompts)
    if confirm and not confirm_prompts:
        print(f"  no held-out prompts after the first {SPEC_PROMPTS}: the confirmation columns "
              "are left out (use more --max-prompts)", flush=True)
    elif confirm:
        after |= {("confirm_" + k.removeprefix("measured_")): v
                  for k, v in measured(trainer.final_state, confirm_prompts).items()}
    print(f"[3/4] train ({config.loss.mask_mode}, {config.loss.kind}, "
          f"{config.loss.position_weights}): {config.train.num_steps} steps in "
          f"{time.perf_counter() - t:.0f} s -> {workdir}")
    return {"before": initial, "after": after}


def _stage(message: str) -> None:
    """A phase starts: one line on stderr now, so a long phase is never silent."""
    print(message, file=sys.stderr, flush=True)


def measure_speculative(drafter, teacher, prompts: list[str]) -> dict:
    """Measured tokens per target call of `drafter` for the demo teacher, greedy and sampled."""
    from llada_jax.speculate.loop import Decoding, speculate

    out = {}
    for name, decoding in (("greedy", Decoding(SPEC_NEW_TOKENS)),
                           ("sampled", Decoding(SPEC_NEW_TOKENS, greedy=False, temperature=1.0))):
        summary = speculate(None, None, prompts, gamma=SPEC_GAMMA, strategy="tli",
                            decoding=decoding, drafter_model=drafter, teacher_model=teacher,
                            drafter_tokenizer=str(ASSETS / "student_tokenizer"),
                            teacher_tokenizer=str(ASSETS / "teacher_tokenizer"))["summary"]
        out[f"measured_{name}"] = summary["tokens_per_target_call"]
        out[f"wall_{name}"] = summary["speedup"]
        out[f"speculate_{name}"] = summary
    return out


def export(workdir: pathlib.Path, export_dir: pathlib.Path) -> pathlib.Path:
    from llada_jax import drafter_contract
    from llada_jax.checkpoints import load_model
    from llada_jax.model.params import save_hf

    _stage("[4/4] export-hf: writing safetensors...")
    _, model = load_model(workdir)
    shutil.rmtree(export_dir, ignore_errors=True)
    save_hf(model, export_dir, source_hf_dir=None)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS / "student_tokenizer" / name, export_dir / name)
    drafter_contract.write(export_dir, drafter_contract.find(workdir))  # as export-hf does
    print(f"[4/4] export-hf: {export_dir}")
    return export_dir


ROWS = (("KL (teacher || student)", "kl"), ("top-1 agreement", "top1"),
        ("acceptance α, lower bound", "alpha_lower"), ("acceptance α, upper bound", "alpha_upper"),
        ("E(γ=4) tokens / target call, lower", "E_lower"),
        ("E(γ=4) tokens / target call, upper", "E_upper"),
        ("MEASURED tokens / target call, greedy (speculate, TLI)", "measured_greedy"),
        ("MEASURED tokens / target call, sampled T=1", "measured_sampled"),
        ("MEASURED wall clock vs teacher alone (x), greedy", "wall_greedy"),
        ("MEASURED wall clock vs teacher alone (x), sampled T=1", "wall_sampled"))


def before_after_table(result: dict) -> str:
    lines = ["", "held-out, drafting condition (γ = 4) | before | after | change",
             "---|---|---|---"]
    for label, key in ROWS:
        b, a = result["before"][key], result["after"][key]
        lines.append(f"{label} | {b:.4f} | {a:.4f} | {a - b:+.4f}")
    return "\n".join(lines)


def recipe_table(rows: dict) -> str:
    """Recipes ranked by measured tokens per target call (mean over seeds; ± the spread, half
    the max - min, where there are several), its ratio to the baseline's (greedy and sampled
    averaged, the ranking key), the same on the confirmation prompts (which rank nothing), and
    the held-out KL, alpha and E(γ) beside them."""
    import numpy as np

    def cell(runs, key, digits=3):
        v = np.asarray([r[key] for r in runs])
        return f"{v.mean():.{digits}f}" + (f" ± {(v.max() - v.min()) / 2:.{digits}f}"
                                            if len(v) > 1 else "")

    def key(name, prefix="measured"):
        return np.mean([_measured(r, prefix) for r in rows[name]])

    def ratio(name, prefix):
        return f"{key(name, prefix) / key(BASELINE, prefix):.3f}" if BASELINE in rows else "-"

    confirm = all("confirm_greedy" in r for runs in rows.values() for r in runs)
    head = f"recipe | seeds | MEASURED greedy | MEASURED sampled | × {BASELINE}"
    head += f" | CONFIRM greedy | CONFIRM sampled | × {BASELINE}" if confirm else ""
    head += " | KL | α lower | α upper | E(γ=4) lower"
    lines = ["", head, "|".join(["---"] * (head.count("|") + 1))]
    for name in sorted(rows, key=lambda n: -key(n)):
        runs = rows[name]
        line = (f"{name} | {len(runs)} | {cell(runs, 'measured_greedy')} | "
                f"{cell(runs, 'measured_sampled')} | {ratio(name, 'measured')}")
        if confirm:
            line += (f" | {cell(runs, 'confirm_greedy')} | {cell(runs, 'confirm_sampled')} | "
                     f"{ratio(name, 'confirm')}")
        lines.append(line + f" | {cell(runs, 'kl')} | {cell(runs, 'alpha_lower')} | "
                     f"{cell(runs, 'alpha_upper')} | {cell(runs, 'E_lower')}")
    return "\n".join(lines)
