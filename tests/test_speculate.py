"""speculate on the demo models: greedy output is the teacher's own greedy decoding, token for
token (generate-teacher's decoder as the independent reference); sampled output follows the
teacher's exact law (seeded chi-square); measures add up; the CLI writes its JSON."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from scipy import stats
from llama_fixtures import hf_greedy

from llada_jax.checkpoints import load_model
from llada_jax.commands.demo import ASSETS
from llada_jax.speculate import rejection, loop as sp, verify
from llada_jax.speculate.draft import Drafter
from llada_jax.speculate.vocab_bridge import VocabBridge
from llada_jax.model.modeling import LLaDAModel
from llada_jax.teacher import generate as gt

STUDENT_TOK, TEACHER_TOK = str(ASSETS / "student_tokenizer"), str(ASSETS / "teacher_tokenizer")
PROMPTS = gt.read_prompts([ASSETS / "prompts_eval.txt"])
PROMPTS = [next(PROMPTS) for _ in range(3)]
MAX_NEW = 12


@pytest.fixture(scope="module")
def teacher():
    return load_model(ASSETS / "teacher", compute_dtype="float32")[1]


@pytest.fixture(scope="module")
def reference(teacher):
    """The teacher's greedy continuations from generate-teacher's own decoder."""
    tok = VocabBridge(STUDENT_TOK, TEACHER_TOK, "tli", student_vocab_size=1536,
                      teacher_vocab_size=2048, mask_token_id=1535)
    ids = [tok.teacher_prompt(p) for p in PROMPTS]
    rows = gt.generate_batch(teacher, ids, gt.Sampling(max_new_tokens=MAX_NEW),
                             tok.stop_ids(teacher.cfg.eos_token_id), 0, teacher.cfg.vocab_size,
                             jax.random.key(0), len(ids), full_logits=False)
    return [r.ids for r in rows]


@functools.cache
def _trained_student():
    return load_model(ASSETS / "student")[1]


def _drafter_model(kind, teacher):
    if kind == "trained":
        return _trained_student()
    if kind == "random":
        return LLaDAModel(_trained_student().cfg, rngs=nnx.Rngs(7))
    # Same tokenizer as the teacher: the teacher's own weights run bidirectionally, pad as mask.
    cfg = teacher.cfg.replace(causal=False, mask_token_id=2044)
    model = LLaDAModel(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(teacher))
    return model


def _run(teacher, kind, strategy, gamma, steps=1, decoding=sp.Decoding(MAX_NEW), seed=0,
         verifier="cached"):
    student = _drafter_model(kind, teacher)
    student_tok = TEACHER_TOK if kind == "same_vocab" else STUDENT_TOK
    bridge = VocabBridge(student_tok, TEACHER_TOK, strategy,
                         student_vocab_size=student.cfg.vocab_size,
                         teacher_vocab_size=teacher.cfg.vocab_size,
                         mask_token_id=student.cfg.mask_token_id)
    drafter = Drafter(student, bridge.allowed, gamma=gamma, steps=steps, trailing_masks=3,
                      temperature=0.0 if decoding.greedy else decoding.temperature)
    target = verify.make_verifier(verifier, teacher, max(map(len, map(bridge.teacher_prompt, PROMPTS))),
                              decoding.max_new_tokens)
    return sp.run_prompts(PROMPTS, drafter, target, bridge, decoding,
                          bridge.stop_ids(teacher.cfg.eos_token_id), seed), bridge


GREEDY_CASES = [  # (drafter, strategy, gamma, steps, verifier)
    *[("trained", strategy, gamma, 1, "cached") for strategy in ("tli", "string")
      for gamma in (1, 4, 8)],
    ("trained", "tli", 4, 2, "cached"), ("random", "tli", 4, 1, "cached"),
    ("random", "string", 8, 1, "cached"), ("same_vocab", "tli", 8, 1, "cached"),
    ("same_vocab", "string", 1, 1, "cached"), ("trained", "tli", 4, 1, "recompute"),
    ("random", "string", 1, 1, "recompute")]


@pytest.mark.slow
@pytest.mark.parametrize("kind,strategy,gamma,steps,verifier", GREEDY_CASES)
def test_greedy_equals_teacher_greedy(teacher, reference, kind, strategy, gamma, steps, verifier):
    results, bridge = _run(teacher, kind, strategy, gamma, steps, verifier=verifier)
    assert bridge.shared == (kind == "same_vocab")
    for row, ref in zip(results["per_prompt"], reference):
        assert row["ids"] == ref
        assert row["equals_teacher_greedy"]
    s = results["summary"]
    assert s["teacher_tokens"] == sum(map(len, reference))
    # Every block costs one teacher call and yields at most its accepted tokens plus one.
    assert s["target_calls"] == sum(len(r["accepted_per_block"]) for r in results["per_prompt"])
    assert s["teacher_tokens"] <= s["target_calls"] + sum(
            sum(r["accepted_per_block"]) for r in results["per_prompt"])
    assert s["drafter_forward_passes"] == steps * s["target_calls"]


def test_block_stats():
    stats_ = sp.block_stats([(4, 4), (4, 1), (2, 0), (3, 2)])
    assert stats_["accepted_per_block"] == [4, 1, 0, 2]
    assert stats_["mean_accepted_per_block"] == 7 / 4
    # offset j: blocks that drafted > j tokens and accepted j of them, and of those, how many
    # accepted the token at j. 0: 4 -> 3; 1: (4,4) (4,1) (3,2) -> 2; 2: (4,4) (3,2) -> 1; 3: 1 -> 1
    assert stats_["acceptance_by_offset"] == [3 / 4, 2 / 3, 1 / 2, 1 / 1]


def _first_token_counts(teacher, strategy, gamma, steps, n):
    """First emitted token over n seeds; the teacher's exact law p and the drafter's law q of
    its first drafted token (tli, one step: the proposal's own law)."""
    student = _drafter_model("trained", teacher)
    bridge = VocabBridge(STUDENT_TOK, TEACHER_TOK, strategy,
                         student_vocab_size=student.cfg.vocab_size,
                         teacher_vocab_size=teacher.cfg.vocab_size,
                         mask_token_id=student.cfg.mask_token_id)
    drafter = Drafter(student, bridge.allowed, gamma=gamma, steps=steps, temperature=1.0)
    verifier = verify.RecomputeVerifier(teacher)
    decoding = sp.Decoding(max_new_tokens=2, greedy=False, temperature=1.0)
    stop = bridge.stop_ids(teacher.cfg.eos_token_id)
    first = [sp.speculate_prompt(PROMPTS[0], drafter, verifier, bridge, decoding, stop,
                                 np.random.default_rng(seed))["ids"][0] for seed in range(n)]
    prompt_ids = bridge.teacher_prompt(PROMPTS[0])
    p = rejection.softmax(verifier.score(prompt_ids, [])[0], 1.0)
    ctx = bridge.student_context(PROMPTS[0], prompt_ids, [])
    q = np.zeros_like(p)
    q_student = drafter.draft(ctx, np.random.default_rng(0)).q_rows[0]
    q[bridge.to_teacher[bridge.allowed]] = q_student[bridge.allowed]
    return np.bincount(first, minlength=len(p)), p, q


def _binned_pvalue(counts, probs):
    """Chi-square over tokens expected >= 5 times, the rest in one bin."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


@pytest.mark.slow
@pytest.mark.parametrize("strategy,gamma,steps", [("tli", 4, 1), ("string", 4, 1), ("tli", 4, 4)])
def test_sampled_first_token_follows_the_teacher_law(teacher, strategy, gamma, steps):
    """tli/1 step verifies with the drafter's q; string verifies point masses; 4 steps commit
    out of order (point masses where q is not the law given the prefix)."""
    counts, p, q = _first_token_counts(teacher, strategy, gamma, steps, 1500)
    assert _binned_pvalue(counts, p) > 1e-3
    assert _binned_pvalue(counts, q) < 1e-6  # power: the drafter's own law is rejected


@pytest.mark.slow
def test_cli_writes_results(tmp_path):
    out = tmp_path / "results.json"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    cmd = [sys.executable, "-m", "llada_jax", "speculate", "--drafter", str(ASSETS / "student"),
           "--teacher", str(ASSETS / "teacher"), "--drafter-tokenizer", STUDENT_TOK,
           "--teacher-tokenizer", TEACHER_TOK, "--prompts", str(prompts), "--gamma", "4",
           "--strategy", "string", "--max-new-tokens", "8", "--out", str(out),
           "--tensorboard", str(tmp_path / "tb")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert results["summary"]["prompts"] == 2
    assert results["summary"]["all_equal_teacher_greedy"]
    assert list((tmp_path / "tb").iterdir())
    bad = subprocess.run(cmd[:-4] + ["--steps", "9"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--steps" in bad.stderr


def test_overlong_prompt_is_a_clear_error(teacher):
    with pytest.raises(sp.SpeculateError, match="prompt 1 has .* max_sequence_length 256"):
        sp.speculate(None, None, ["In the", "And " * 300], decoding=sp.Decoding(8),
                     drafter_model=_trained_student(), teacher_model=teacher,
                     drafter_tokenizer=STUDENT_TOK, teacher_tokenizer=TEACHER_TOK)


@pytest.mark.slow
@pytest.mark.parametrize("strategy,kind", [("tli", "trained"), ("string", "random")])
def test_hf_llama_teacher_greedy_equals_transformers_generate(llama_teacher, teacher, strategy,
                                                              kind):
    """An HF LlamaForCausalLM teacher (its own tokenizer) and a LLaDA drafter with the demo
    student's tokenizer: the output is transformers' own greedy generate, token for token."""
    hf_dir, tok = llama_teacher
    prompts, new = ["the cat sat", "a quick brown fox jumps over", "dog"], 20
    want = hf_greedy(hf_dir, tok, prompts, new)
    llama = load_model(hf_dir, compute_dtype="float32")[1]
    for gamma in (1, 4, 8):
        results = sp.speculate(None, str(hf_dir), prompts, gamma=gamma, strategy=strategy,
                               decoding=sp.Decoding(new), drafter_tokenizer=STUDENT_TOK,
                               drafter_model=_drafter_model(kind, teacher), teacher_model=llama)
        assert [row["ids"] for row in results["per_prompt"]] == want
