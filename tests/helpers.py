"""Fixtures shared by the test modules: toy tokenizers and teacher records, a small real dataset,
tiny random HF LLaDA directories, NumPy references of the divergences, packed batches.

Test modules import from here (never from each other), so each helper has one home.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import pathlib
import socket

import jax
import numpy as np
from tokenizers import Tokenizer

from data_pipeline import records
from data_pipeline.toy_tokenizers import save_toy_tokenizers
from llada_jax.distill import divergences

ROOT = pathlib.Path(__file__).parents[1]


# -- toy tokenizers and seed-format teacher records ---------------------------------------------

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Snow ☃ falls on the café in Zürich; naïve façades glow.",
    "def add(a, b):\n    return a + b  # tabs\tand  spaces",
    "Speculative decoding drafts tokens that a larger model verifies.",
] * 4


def make_tokenizers(out_dir: str) -> tuple[str, str]:
    """(teacher_dir, student_dir): byte-level BPE teacher, sentencepiece-style student."""
    return save_toy_tokenizers(TEXTS, os.path.join(out_dir, "tok"))


def teacher_record(tok: Tokenizer, prompt: str, response: str, rng: np.random.Generator,
                   full: bool = True) -> dict:
    """The record a teacher with tokenizer `tok` would dump for `response` (random logits)."""
    enc = tok.encode(response, add_special_tokens=False)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    entries = []
    for pos, (tid, token) in enumerate(zip(enc.ids, enc.tokens)):
        logits = rng.normal(0.0, 3.0, vocab).round(4)
        logits[tid] += 8.0
        top = np.argsort(-logits, kind="stable")[:5]
        entry = {"position": pos, "chosen_token": token, "chosen_token_id": tid,
                 "top_5": [{"token": tok.id_to_token(int(i)), "token_id": int(i),
                            "logit": float(logits[i])} for i in top]}
        if full:
            entry["full_logits"] = logits.tolist()
        entries.append(entry)
    return {"prompt": prompt, "response": response, "logits": entries}


def write_json(path: str, records: list, jsonl: bool = False) -> str:
    with open(path, "w", encoding="utf-8") as f:
        if jsonl:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        else:
            json.dump(records, f, ensure_ascii=False)
    return path


def toy_teacher_records(root: str, pairs, full=lambda i: True, seed: int = 0
                        ) -> tuple[str, str, list[dict]]:
    """(teacher_dir, student_dir, records): toy tokenizers under `root` and one teacher record
    per (prompt, response) pair, with full logits where full(i)."""
    from tokenizers import Tokenizer

    teacher_dir, student_dir = make_tokenizers(root)
    teacher = Tokenizer.from_file(os.path.join(teacher_dir, "tokenizer.json"))
    rng = np.random.default_rng(seed)
    return teacher_dir, student_dir, [teacher_record(teacher, p, r, rng, full=full(i))
                                      for i, (p, r) in enumerate(pairs)]


# -- a small real dataset for training tests ----------------------------------------------------

WORDS = sorted({w for t in TEXTS for w in t.replace("\n", " ").split()})


def random_examples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS, rng.integers(3, 8))) + f" #{i}:"
        response = " " + " ".join(rng.choice(WORDS, rng.integers(4, 14)))
        out.append((prompt, response))
    return out


def make_dataset(root: str, n: int = 96, *, seed: int = 0, top_k: int = 8,
                 max_length: int = 64) -> str:
    """Builds tokenizers, a teacher dump with full logits and the dataset; returns DATA_DIR."""
    from data_pipeline.convert import Options
    from data_pipeline.preprocess import preprocess

    teacher_dir, student_dir, recs = toy_teacher_records(root, random_examples(n, seed), seed=seed)
    dump = write_json(os.path.join(root, "teacher.jsonl"), recs, jsonl=True)
    data_dir = os.path.join(root, "data")
    preprocess([dump], data_dir, Options(student_dir, teacher_dir, max_length, top_k,
                                         validation_fraction=0.2), workers=1)
    return data_dir


def final_params(workdir) -> dict:
    """A train workdir's latest params as a nested dict of NumPy arrays."""
    from flax import nnx

    from llada_jax.checkpoints import load_model

    _, model = load_model(workdir)
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


# -- tiny random HF LLaDA directories (config.json + safetensors), written with torch ----------

PREFIX = "model.transformer."


def hf_config(**changes) -> dict:
    """A tiny LLaDA config.json dict with the fields the real LLaDA-8B config has."""
    cfg = {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0,
        "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModel": "modeling_llada.LLaDAModelLM",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
        "d_model": 48, "embedding_dropout": 0.0, "embedding_size": 64, "eos_token_id": 60,
        "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
        "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02,
        "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
        "mask_token_id": 58, "max_sequence_length": 64, "mlp_hidden_size": 40, "mlp_ratio": 4,
        "model_type": "llada", "multi_query_attention": None, "n_heads": 3, "n_kv_heads": 3,
        "n_layers": 2, "pad_token_id": 60, "precision": "amp_bf16", "residual_dropout": 0.0,
        "rms_norm_eps": 1e-5, "rope": True, "rope_full_precision": True, "rope_theta": 10000.0,
        "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False,
        "vocab_size": 61, "weight_tying": False,
    }
    cfg.update(changes)
    return cfg


def random_state(cfg: dict, seed: int = 0) -> dict:
    """float32 HF state dict with O(1) activations and logits."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    d, f, v = cfg["d_model"], cfg["mlp_hidden_size"], cfg["embedding_size"]
    hd = d // cfg["n_heads"]
    kv = (cfg["n_kv_heads"] or cfg["n_heads"]) * hd
    linear = lambda out, inp: torch.randn(out, inp, generator=gen) / inp ** 0.5
    norm = lambda: 1.0 + 0.1 * torch.randn(d, generator=gen)
    state = {PREFIX + "wte.weight": linear(v, d)}  # also the LM head when tied: O(1) logits
    for i in range(cfg["n_layers"]):
        b = f"{PREFIX}blocks.{i}."
        state.update({
            b + "attn_norm.weight": norm(), b + "q_proj.weight": linear(d, d),
            b + "k_proj.weight": linear(kv, d), b + "v_proj.weight": linear(kv, d),
            b + "attn_out.weight": linear(d, d), b + "ff_norm.weight": norm(),
            b + "ff_proj.weight": linear(f, d), b + "up_proj.weight": linear(f, d),
            b + "ff_out.weight": linear(d, f)})
    state[PREFIX + "ln_f.weight"] = norm()
    if not cfg["weight_tying"]:
        state[PREFIX + "ff_out.weight"] = linear(v, d)
    return state


def write_hf_dir(path: pathlib.Path, cfg: dict, state: dict,
                 shards: int = 3) -> pathlib.Path:
    """config.json + `shards` safetensors files (+ index when shards > 1), HF naming."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    names = list(state)
    if shards == 1:
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
        return path
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n].contiguous() for n in names[s::shards]}
        save_file(part, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return path


# -- NumPy (float64) references of the bucket divergences ---------------------------------------

def np_softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def np_plogratio(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a > 0, a * (np.log(np.where(a > 0, a, 1)) - np.log(b)), 0.0)


def np_divergence(p, q, kind, beta=0.5, lk_decay=1.0, lk_weight=None):
    """Reference divergences over the last axis, float64, written from the definitions.
    lk: lk_weight (default exp(-lk_decay alpha) at p, q) is the KL weight w, held fixed in the
    gradient by the loss, so a finite-difference reference passes the base point's w."""
    alpha = np.minimum(p, q).sum(-1)
    if kind == "alpha":
        return -np.log(alpha)
    if kind == "lk":
        w = np.exp(-lk_decay * alpha) if lk_weight is None else lk_weight
        return w * np_plogratio(p, q).sum(-1) + (1 - w) * (1 - alpha)
    if kind == "kl":
        return np_plogratio(p, q).sum(-1)
    if kind == "reverse_kl":
        return np_plogratio(q, np.where(p > 0, p, divergences.REVERSE_KL_TEACHER_FLOOR)).sum(-1)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * np_plogratio(p, m).sum(-1) + (1 - beta) * np_plogratio(q, m).sum(-1)
    return 0.5 * np.abs(p - q).sum(-1)


def np_buckets(student_logits, ids, lps, temperature):
    """(p, q) over S ∪ {tail}: teacher tail = 1 - sum p_S (0 below rounding level), tempered as
    p^(1/T) / Z; student tail = the student's mass outside S, summed directly in float64."""
    q = np_softmax(student_logits.astype(np.float64) / temperature)
    valid = lps > -np.inf
    q_s = np.where(valid, np.take_along_axis(q, ids, -1), 0.0)
    p_s = np.where(valid, np.exp(lps.astype(np.float64)), 0.0)
    p_tail = 1.0 - p_s.sum(-1, keepdims=True)
    p_tail = np.where(p_tail < divergences.TEACHER_TAIL_MIN, 0.0, p_tail)
    w = np.concatenate([p_s, p_tail], -1) ** (1.0 / temperature)
    return w / w.sum(-1, keepdims=True), np.concatenate([q_s, 1.0 - q_s.sum(-1, keepdims=True)], -1)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def jax_divergence(logits, ids, lps, kind, temperature, beta=0.5, lk_decay=1.0):
    logp, logq = divergences.bucket_logprobs(logits, ids, lps, temperature)
    return divergences.divergence(logp, logq, kind, beta, lk_decay)


def full_vocab_case(rng, n=6, v=40):
    """Teacher = a full softmax given as k = V sorted log-probs; student logits [n, v] near it
    (divergences O(0.1 - 1), where fp32 resolves 1e-6 absolute)."""
    teacher_logits = 2.0 * rng.normal(size=(n, v))
    student_logits = (teacher_logits + rng.normal(size=(n, v))).astype(np.float32)
    lp = np.log(np_softmax(teacher_logits))
    ids = np.argsort(-lp, -1).astype(np.int32)
    return teacher_logits, student_logits, ids, np.take_along_axis(lp, ids, -1).astype(np.float32)


def topk_case(rng, n=8, v=40, k=6):
    """Top-k rows with a real tail; row 1 renormalised top-5 (tail 0); rows 2, 3 have -inf unused
    slots (ids 0 there, as in the records); row 4 all unused (a non-target position)."""
    student = (2.0 * rng.normal(size=(n, v))).astype(np.float32)
    ids = np.stack([rng.permutation(v)[:k] for _ in range(n)]).astype(np.int32)
    lp = np.sort(np.log(rng.dirichlet(np.full(v, 0.3), size=n)[:, :k]), -1)[:, ::-1].copy()
    lp[1, :5] -= np.log(np.exp(lp[1, :5]).sum())
    lp[1, 5:] = -np.inf
    lp[2, 4:] = -np.inf
    lp[3, 1:] = -np.inf
    lp[4, :] = -np.inf
    for row in (1, 2, 3, 4):
        ids[row][lp[row] == -np.inf] = 0
    return student, ids, lp.astype(np.float32)


# -- packed batches for the masking and metric tests --------------------------------------------

MASK = 126336


def packed_batch(rng, rows, seq, segments):
    """Rows packed with `segments` [(prompt_len, response_len), ...] then padding; tokens are
    random non-mask ids; ~80% of response positions have a teacher target."""
    tokens = rng.integers(1, 1000, size=(rows, seq)).astype(np.int32)
    segment_ids = np.zeros((rows, seq), np.int32)
    prompt = np.zeros((rows, seq), bool)
    start = 0
    for sid, (n_prompt, n_response) in enumerate(segments, start=1):
        segment_ids[:, start:start + n_prompt + n_response] = sid
        prompt[:, start:start + n_prompt] = True
        start += n_prompt + n_response
    assert start <= seq
    tokens[segment_ids == 0] = 0
    target = (segment_ids > 0) & ~prompt & (rng.random((rows, seq)) < 0.8)
    return {"tokens": tokens, "segment_ids": segment_ids, "prompt_mask": prompt,
            "target_mask": target}


SEGMENTS = [(3, 5), (2, 9), (4, 1), (1, 6)]


def all_examples(out) -> dict:
    """example_id -> (split, example) over every split of a written dataset."""
    got = {}
    for split in records.SPLITS:
        src = records.open_split(out, split)
        for i in range(len(src)):
            ex = src[i]
            got[ex["example_id"]] = (split, ex)
    return got


def write_csv(path, records, header=("prompt", "response", "logits_data")):
    """The original generator's CSV (prompt, response, logits_data = JSON of `logits`)."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in records:
            if isinstance(r, list):
                w.writerow(r)  # a raw row, as given
            else:
                w.writerow([r["prompt"], r["response"], json.dumps(r["logits"])])
    return str(path)


def free_port() -> int:
    """A free localhost TCP port (for jax.distributed coordinators)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
