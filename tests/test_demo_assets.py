"""The shipped demo assets: real (better than unigram) teacher and student, distinct tokenizers."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import PreTrainedTokenizerFast

import llada_jax
from llada_jax.teacher import generate as gt
from llada_jax.checkpoints import load_params

ASSETS = pathlib.Path(llada_jax.__file__).parent / "demo_assets"
HELDOUT_VERSES = 96
LENGTH = 128
MASK_RATIO = 0.3



def _lines(name):
    return [line for line in (ASSETS / name).read_text().splitlines() if line.strip()]


def _heldout():
    return _lines("corpus_heldout.txt")[:HELDOUT_VERSES]


def _tokenizer(name):
    return PreTrainedTokenizerFast.from_pretrained(str(ASSETS / name))


@jax.jit
def _log_probs(split, tokens_bl, segment_ids_bl=None):
    return jax.nn.log_softmax(nnx.merge(*split)(tokens_bl, segment_ids_bl=segment_ids_bl))


def _unigram_log_probs(tok, eot, skip_first):
    """Add-one smoothed unigram log-probs over the training verses (+ <|eot_id|> per verse)."""
    counts = np.ones(len(tok))
    for ids in tok(_lines("corpus_train.txt"))["input_ids"]:
        np.add.at(counts, ids[skip_first:] + [eot], 1)
    return np.log(counts / counts.sum())


def test_teacher_beats_a_unigram_model_on_the_heldout_tail():
    model, tok = gt.load_teacher(ASSETS / "teacher", ASSETS / "teacher_tokenizer")
    assert model.cfg.causal and model.cfg.n_kv_heads < model.cfg.n_heads  # LLaMA-style, GQA
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert model.cfg.eos_token_id == eot == tok.eos_token_id
    docs = [ids[:LENGTH - 1] + [eot] for ids in tok(_heldout())["input_ids"]]
    assert all(d[0] == tok.bos_token_id for d in docs)
    tokens = np.zeros((len(docs), LENGTH), np.int32)
    for row, doc in enumerate(docs):
        tokens[row, :len(doc)] = doc
    logp = np.asarray(_log_probs(nnx.split(model), jnp.asarray(tokens)))
    # Right padding, causal attention: position j predicts token j+1 of the same verse.
    teacher_nll = -np.mean([logp[r, j, d[j + 1]] for r, d in enumerate(docs) for j in range(len(d) - 1)])

    unigram = _unigram_log_probs(tok, eot, skip_first=1)  # BOS is never predicted
    unigram_nll = -np.mean([unigram[t] for d in docs for t in d[1:]])
    assert teacher_nll < unigram_nll - 1.0, (teacher_nll, unigram_nll)


def test_tokenizers_differ_and_give_character_offsets():
    teacher, student = _tokenizer("teacher_tokenizer"), _tokenizer("student_tokenizer")
    assert (len(teacher), len(student)) == (2048, 1536)
    # The teacher's stop token exists in the student vocabulary (it maps by string).
    assert student.mask_token == "<|mdm_mask|>" and "<|eot_id|>" in student.get_vocab()
    text = _lines("corpus_heldout.txt")[0] + " 1234 (x)"
    tokenizations = []
    for tok in (teacher, student):
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        # The offsets tile the text: each token's span decodes to exactly that token.
        assert "".join(text[a:b] for a, b in enc["offset_mapping"]) == text
        assert all(text[a:b] == tok.decode([i]) for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]))
        tokenizations.append([tuple(o) for o in enc["offset_mapping"]])
    assert tokenizations[0] != tokenizations[1]
    assert teacher("x")["input_ids"][0] == teacher.bos_token_id
    assert student("x")["input_ids"] == student("x", add_special_tokens=False)["input_ids"]


def test_student_unmasks_heldout_verses_better_than_unigram():
    cfg, model = load_params(ASSETS / "student", dtype="float32", compute_dtype="float32")
    tok = _tokenizer("student_tokenizer")
    assert not cfg.causal
    assert (cfg.vocab_size, cfg.mask_token_id) == (len(tok), tok.mask_token_id)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    docs = [ids[:LENGTH - 1] + [eot] for ids in tok(_heldout())["input_ids"]]
    tokens, segments = np.zeros((len(docs), LENGTH), np.int32), np.zeros((len(docs), LENGTH), np.int32)
    for row, doc in enumerate(docs):
        tokens[row, :len(doc)], segments[row, :len(doc)] = doc, 1
    masked = (np.random.default_rng(0).random(tokens.shape) < MASK_RATIO) & (segments == 1)
    noisy = np.where(masked, cfg.mask_token_id, tokens)
    logp = np.asarray(_log_probs(nnx.split(model), jnp.asarray(noisy), jnp.asarray(segments)))
    rows, cols = np.nonzero(masked)
    student_nll = -np.mean(logp[rows, cols, tokens[rows, cols]])
    unigram_nll = -np.mean(_unigram_log_probs(tok, eot, skip_first=0)[tokens[rows, cols]])
    # A real drafter: ~1.4 nats/token better than unigram at 30 % masking.
    assert student_nll < unigram_nll - 1.0, (student_nll, unigram_nll)


def _flops_per_position(cfg, model, context):
    """2 x the weights a position multiplies by (the tied embedding once more, as the LM head)
    + QK^T and PV over `context` keys."""
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    matrices = sum(x.size for path, x in leaves if x.ndim >= 2 and "wte" not in jax.tree_util.keystr(path))
    return 2 * (matrices + cfg.vocab_size * cfg.d_model) + 4 * cfg.n_layers * cfg.d_model * context


def test_the_teacher_costs_at_least_8x_the_student_per_token():
    """Issue 24: a drafter must be much cheaper than its teacher for speculation to pay."""
    (t_cfg, teacher), (s_cfg, student) = (load_params(ASSETS / name, dtype="float32")
                                          for name in ("teacher", "student"))
    assert t_cfg.weight_tying and s_cfg.weight_tying
    for context in (64, 256):
        ratio = _flops_per_position(t_cfg, teacher, context) / _flops_per_position(s_cfg, student, context)
        assert ratio >= 8, (context, ratio)


def test_prompts_come_from_heldout_verses_only():
    heldout = _lines("corpus_heldout.txt")
    for name in ("prompts_train.txt", "prompts_eval.txt"):
        prompts = _lines(name)
        assert len(prompts) >= 80
        assert all(any(v.startswith(p + " ") for v in heldout) for p in prompts)
    assert not set(_lines("prompts_train.txt")) & set(_lines("prompts_eval.txt"))


def test_assets_stay_small():
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total < 6 * 2**20, total
