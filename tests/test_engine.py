"""The compiled speculative engine: batched greedy output is each row's own greedy decoding
(CachedLM, batch 1) and transformers' greedy generate; the sampled law is the teacher's
(chi-square); the incremental student context equals full re-tokenisation; the same tokens on
an 8-device mesh; real vocabulary sizes within 4 GiB."""

import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats
from llama_fixtures import hf_greedy

from llada_jax import sharding
from llada_jax.checkpoints import load_model
from llada_jax.commands.demo import ASSETS
from llada_jax.speculate import loop as sp
from llada_jax.speculate.vocab_bridge import VocabBridge
from llada_jax.model.modeling import LLaDAModel
from llada_jax.speculate import step as st
from llada_jax.speculate.context import EngineBridge
from llada_jax.speculate.engine import EngineSettings, SpeculativeEngine
from llada_jax.teacher.prompts import read_prompts
from llada_jax.decode.cached import CachedLM

STUDENT_TOK, TEACHER_TOK = str(ASSETS / "student_tokenizer"), str(ASSETS / "teacher_tokenizer")
# Rows of different lengths; with batch size 2 the second batch holds one real row.
PROMPTS = list(read_prompts([ASSETS / "prompts_eval.txt"]))[:3]
MAX_NEW = 12


@functools.cache
def _teacher():
    return load_model(ASSETS / "teacher", compute_dtype="float32")[1]


@functools.cache
def _student(kind="trained"):
    if kind == "trained":
        return load_model(ASSETS / "student")[1]
    # One vocabulary: the teacher's own weights run bidirectionally (its pad id as the mask).
    model = LLaDAModel(_teacher().cfg.replace(causal=False, mask_token_id=2044), rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(_teacher()))
    return model


@functools.cache
def _bridge(kind="trained"):
    student = _student(kind)
    return VocabBridge(TEACHER_TOK if kind == "same_vocab" else STUDENT_TOK, TEACHER_TOK, "tli",
                       student_vocab_size=student.cfg.vocab_size,
                       teacher_vocab_size=_teacher().cfg.vocab_size,
                       mask_token_id=student.cfg.mask_token_id)


def cached_greedy(model, prompts_ids, max_new, stop_ids, width=64):
    """Each row alone (batch 1): CachedLM prefill, then one greedy k = 1 step per token."""
    vocab, outs = model.cfg.vocab_size, []
    lm = CachedLM(model, batch_size=1, max_length=width + max_new + 1)
    for ids in prompts_ids:
        tokens = np.zeros((1, width), np.int32)
        tokens[0, width - len(ids):] = ids
        logits, out = lm.prefill(tokens, [width - len(ids)]), []
        while len(out) < max_new and not (out and out[-1] in stop_ids):
            out.append(int(np.argmax(np.asarray(logits)[0, :vocab])))
            logits = lm.extend(np.array([[out[-1]]], np.int32))[:, 0]
        outs.append(out)
    return outs


@pytest.fixture(scope="module")
def reference():
    bridge = _bridge()
    stop = bridge.stop_ids(_teacher().cfg.eos_token_id)
    return cached_greedy(_teacher(), [bridge.teacher_prompt(p) for p in PROMPTS], MAX_NEW, stop)


def _engine(kind="trained", mesh=None, **settings):
    bridge = _bridge(kind)
    settings = EngineSettings(**{"max_new_tokens": MAX_NEW, "batch_size": 2,
                                 "trailing_masks": 3, **settings})
    return SpeculativeEngine(_student(kind), _teacher(), EngineBridge.from_vocab_bridge(bridge),
                             settings, mesh=mesh,
                             stop_ids=bridge.stop_ids(_teacher().cfg.eos_token_id))


GREEDY = [  # (drafter, gamma, drafter cache, draft confidence, steps)
    ("trained", 1, "none", None, 1), ("trained", 4, "prefix", None, 1),
    ("trained", 8, "none", 0.05, 1), ("trained", 4, "prefix", 0.05, 2),
    ("same_vocab", 4, "prefix", None, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("kind,gamma,cache,confidence,steps", GREEDY)
def test_batched_greedy_equals_each_rows_own_greedy(reference, kind, gamma, cache, confidence,
                                                    steps):
    engine = _engine(kind, gamma=gamma, drafter_cache=cache, draft_confidence=confidence,
                     steps=steps, refresh_every=3)
    spec = engine.generate(PROMPTS)
    assert [r["ids"] for r in spec] == reference
    assert [r["ids"] for r in engine.teacher_only(PROMPTS)] == reference
    blocks = [b for r in spec for b in r["blocks"]]
    assert all(0 <= accepted <= proposed <= gamma for proposed, accepted in blocks)
    # Each block emits its accepted draft + one teacher token (the last may be cut at a stop).
    assert sum(len(r["ids"]) for r in spec) <= sum(a + 1 for _, a in blocks)
    if kind == "trained":  # drafts were accepted: the acceptance path ran
        assert sum(a for _, a in blocks) > 0
    if confidence is not None and gamma == 8:  # a first block (room for 11) was cut short
        assert any(r["blocks"][0][0] < gamma for r in spec)


@pytest.mark.slow
def test_engine_results_keep_speculates_keys_and_string_stays_on_the_host(reference):
    """speculate(): tli through the engine (its JSON keys, speedup over its own baseline);
    string still through the host loop; both the teacher's greedy output."""
    common = dict(drafter_model=_student(), teacher_model=_teacher(), decoding=sp.Decoding(MAX_NEW),
                  drafter_tokenizer=STUDENT_TOK, teacher_tokenizer=TEACHER_TOK, trailing_masks=3)
    tli = sp.speculate(None, None, PROMPTS, gamma=4, strategy="tli",
                       engine=dict(batch_size=2, drafter_cache="prefix"), **common)
    assert tli["settings"]["engine"] and [r["ids"] for r in tli["per_prompt"]] == reference
    for key in ("tokens_per_target_call", "speedup", "acceptance_by_offset",
                "all_equal_teacher_greedy", "teacher_only_tokens_per_s"):
        assert key in tli["summary"]
    assert tli["summary"]["all_equal_teacher_greedy"]
    string = sp.speculate(None, None, PROMPTS[:1], gamma=4, strategy="string", **common)
    assert [r["ids"] for r in string["per_prompt"]] == reference[:1]
    bare = sp.speculate(None, None, PROMPTS[:1], gamma=4, strategy="tli", baseline=False,
                        engine=dict(batch_size=2, drafter_cache="prefix"), **common)
    assert "speedup" not in bare["summary"] and bare["per_prompt"][0]["ids"] == reference[0]


def test_bad_engine_settings_are_clear_errors():
    with pytest.raises(sp.SpeculateError, match="--drafter-cache 'full'"):
        _engine(drafter_cache="full")
    with pytest.raises(sp.SpeculateError, match="--draft-confidence"):
        _engine(draft_confidence=1.5)


def test_incremental_student_context_equals_full_retokenisation(reference):
    bridge = _bridge()
    engine_bridge = EngineBridge.from_vocab_bridge(bridge)
    rng = np.random.default_rng(0)
    for prompt, completion in zip(PROMPTS, reference):
        teacher_ids, row = engine_bridge.start(prompt)
        done = []
        while len(done) < len(completion):
            new = completion[len(done):len(done) + int(rng.integers(1, 6))]
            before = list(row.ids)
            changed = row.extend(new)
            done += new
            assert row.ids == bridge.student_context(prompt, teacher_ids, done)
            assert row.ids[:changed] == before[:changed]


@pytest.mark.slow
def test_hf_llama_teacher_equals_transformers_generate(llama_teacher):
    """An HF LlamaForCausalLM teacher with its own tokenizer, the demo student drafting through
    the TLI bridge with the prefix cache: transformers' greedy generate, token for token."""
    hf_dir, tok = llama_teacher
    prompts, new = ["the cat sat", "a quick brown fox jumps over", "dog"], 20
    want = hf_greedy(hf_dir, tok, prompts, new)
    results = sp.speculate(None, str(hf_dir), prompts, gamma=4, decoding=sp.Decoding(new),
                           drafter_tokenizer=STUDENT_TOK, drafter_model=_student(),
                           teacher_model=load_model(hf_dir, compute_dtype="float32")[1],
                           engine=dict(batch_size=2, drafter_cache="prefix", refresh_every=2))
    assert [row["ids"] for row in results["per_prompt"]] == want


# ------------------------------------------------------------------------------ sampled law

def _chi2_pvalue(counts, probs):
    """Chi-square over outcomes expected >= 5 times, the rest in one bin."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue


@pytest.mark.parametrize("case", ["exact_q", "point_mass", "cut"])
def test_accept_sampled_emits_the_teachers_law(case):
    """Many rows of one block on a 6-token vocabulary: the first emitted token follows p_0
    exactly, whatever q the draft came from, a point mass, or a cut draft (p's bonus)."""
    rows, vocab, gamma = 40000, 6, 2
    key_p, key_q, key_x, key_v = jax.random.split(jax.random.key(1), 4)
    logits = jnp.broadcast_to(jax.random.normal(key_p, (1, gamma + 1, vocab)) * 1.5,
                              (rows, gamma + 1, vocab))
    logq = jax.nn.log_softmax(jax.random.normal(key_q, (gamma, vocab)) * 1.5)
    draft = jax.random.categorical(key_x, jnp.broadcast_to(logq, (rows, gamma, vocab)))
    exact = jnp.full((rows, gamma), case == "exact_q")
    valid = jnp.full((rows, gamma), case != "cut")
    logq_x = jnp.where(exact, jnp.take_along_axis(jnp.broadcast_to(logq, (rows, gamma, vocab)),
                                                  draft[..., None], axis=2)[..., 0], 0.0)

    def q_row(n):
        j = jnp.minimum(n, gamma - 1)
        point = jax.nn.one_hot(jnp.take_along_axis(draft, j[:, None], axis=1)[:, 0], vocab)
        return jnp.where(exact[:, :1], jnp.exp(logq[j]), point)

    n, token = st.accept_sampled(logits, draft, valid, logq_x, q_row, 1.0, key_v)
    first = np.where(np.asarray(n) > 0, np.asarray(draft[:, 0]), np.asarray(token))
    p0 = np.asarray(jax.nn.softmax(logits[0, 0]), np.float64)
    counts = np.bincount(first, minlength=vocab)
    assert _chi2_pvalue(counts, p0 / p0.sum()) > 1e-3
    q0 = np.exp(np.asarray(logq[0], np.float64))
    if case == "exact_q":  # power: the drafter's own law is told apart
        assert _chi2_pvalue(counts, q0) < 1e-6
    if case == "cut":
        assert (np.asarray(n) == 0).all()


@pytest.mark.slow
def test_engine_sampled_first_token_follows_the_teacher_law():
    """The whole engine, sampled (T = 1, one draft position before the end): the first emitted
    token of one prompt in 64 rows x 16 runs follows the teacher's softmax."""
    prompt = PROMPTS[0]
    engine = _engine(gamma=4, greedy=False, max_new_tokens=2, batch_size=64,
                     drafter_cache="prefix")
    first = []
    for seed in range(16):
        engine.s = dataclasses.replace(engine.s, seed=seed)
        first += [r["ids"][0] for r in engine.generate([prompt] * 64)]
    ids = _bridge().teacher_prompt(prompt)
    lm = CachedLM(_teacher(), batch_size=1, max_length=len(ids) + 1)
    p = np.asarray(jax.nn.softmax(lm.prefill(np.array([ids], np.int32), [0])[0]), np.float64)
    counts = np.bincount(first, minlength=len(p))
    assert _chi2_pvalue(counts, p / p.sum()) > 1e-3


# ------------------------------------------------------------------------- sharded, big vocab

@pytest.mark.slow
def test_sharded_engine_gives_the_same_tokens(reference):
    """Drafter and teacher on one 8-device mesh (rows over data, heads over tensor)."""
    mesh = sharding.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
    engine = _engine(mesh=mesh, gamma=4, drafter_cache="prefix", batch_size=4)
    assert [r["ids"] for r in engine.generate(PROMPTS)] == reference
    spec = sharding.spec_for(engine.t_cache.k.shape, ("batch", "layers", "cache_length",
                                                       "act_kv_heads", "head_dim"),
                             mesh, sharding.DEFAULT_RULES, strict=False)
    assert "tensor" in str(spec)
    assert engine.t_cache.k.sharding.is_equivalent_to(jax.NamedSharding(mesh, spec), 5)


REAL_VOCAB = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from flax import nnx
    from llada_jax.model.config import ModelConfig
    from llada_jax.model.modeling import LLaDAModel
    from llada_jax.speculate.context import IdBridge
    from llada_jax.speculate.engine import EngineSettings, SpeculativeEngine
    sys.path.insert(0, "tests")
    from test_engine import cached_greedy
    VS, VT = 126464, 128256
    common = dict(d_model=32, n_heads=2, n_kv_heads=1, n_layers=2, mlp_hidden_size=64,
                  dtype="float32", eos_token_id=None)
    teacher = LLaDAModel(ModelConfig(vocab_size=VT, mask_token_id=None, causal=True,
                                     model_type="llama", **common), rngs=nnx.Rngs(0))
    student = LLaDAModel(ModelConfig(vocab_size=VS, mask_token_id=VS - 1, causal=False,
                                     **common), rngs=nnx.Rngs(1))
    to_student = np.where(np.arange(VT) < VS - 1, np.arange(VT), 0)
    bridge = IdBridge(np.arange(VS), np.ones(VS, bool), to_student)
    prompts = [[5, 900, 126000, 17], [128000, 3]]
    engine = SpeculativeEngine(student, teacher, bridge, EngineSettings(
        gamma=4, max_new_tokens=10, batch_size=2, drafter_cache=sys.argv[1]))
    got = [r["ids"] for r in engine.generate(prompts)]
    want = cached_greedy(teacher, prompts, 10, set())
    # VmHWM: this process's own peak (ru_maxrss may carry the parent's over the exec).
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"equal": got == want, "rss_gib": int(hwm.split()[1]) / 2 ** 20,
                      "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}))
""")


@pytest.mark.slow
def test_real_vocabulary_sizes_run_within_4_gib():
    """A drafter with 126,464 logits, a teacher with 128,256 (tiny widths): greedy equals the
    teacher's own, peak RSS of the whole process < 4 GiB."""
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", REAL_VOCAB, "prefix"], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["equal"]
    assert result["rss_gib"] < 4.0
