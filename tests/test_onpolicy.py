"""On-policy records and data.mix: records read back through the loader equal the teacher's own
distributions at the drafted slots (float64 NumPy from a plain forward of the teacher, no KV
cache, vocabularies matched by token string here); the mixture is deterministic, in proportion
and resumes bit-exactly; bad mixes and on-policy settings are clear ConfigErrors."""

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import AutoTokenizer

from data_pipeline import loader
from data_pipeline.convert import Options
from data_pipeline.preprocess import preprocess
from llada_jax.checkpoints import load_model
from llada_jax.commands.demo import ASSETS
from llada_jax.errors import ConfigError
from llada_jax.speculate import loop as sp
from llada_jax.onpolicy import collect, rounds
from llada_jax.teacher.prompts import read_prompts
from llada_jax.train import config as train_config
from tests.helpers import random_examples, toy_teacher_records, write_json

STUDENT_TOK, TEACHER_TOK = str(ASSETS / "student_tokenizer"), str(ASSETS / "teacher_tokenizer")
TOP_K, GAMMA, TRAILING = 16, 4, 3


class Recording(collect.HostLoopCollector):
    """The host-loop collector, keeping every block it hands to the writer."""

    def blocks(self, prompts, seed):
        self.seen = []
        for index, block in super().blocks(prompts, seed):
            self.seen.append(block)
            yield index, block


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    prompts = list(itertools.islice(read_prompts([ASSETS / "prompts_train.txt"]), 2))
    decoding = sp.Decoding(10, greedy=False, temperature=1.0)
    session = sp.setup(str(ASSETS / "student"), str(ASSETS / "teacher"), prompts,
                       gamma=GAMMA, trailing_masks=TRAILING, decoding=decoding,
                       drafter_tokenizer=STUDENT_TOK, teacher_tokenizer=TEACHER_TOK)
    collector = Recording(session, decoding)
    out = str(tmp_path_factory.mktemp("onpolicy") / "round")
    opts = collect.collector_options(session, STUDENT_TOK, TEACHER_TOK, TOP_K, 96, 1)
    report = collect.write_records_atomically(collector, prompts, out, opts, seed=(5,))
    return out, report, collector.seen, session


def _teacher_forward(teacher, width: int = 64):
    """ids -> float64 [V_teacher]: log-softmax of the teacher's next-token logits after `ids`,
    from one plain causal forward over the sequence (padded after its end, which a causal
    model never sees), no KV cache."""
    graphdef, state = nnx.split(teacher)
    logits_fn = jax.jit(lambda st, tokens: nnx.merge(graphdef, st)(tokens))

    def logprobs(ids: list[int]) -> np.ndarray:
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(ids)] = ids
        logits = np.asarray(logits_fn(state, jnp.asarray(tokens))[0, len(ids) - 1], np.float64)
        shifted = logits - logits.max()
        return shifted - np.log(np.exp(shifted).sum())
    return logprobs


def _teacher_to_student() -> tuple[np.ndarray, np.ndarray]:
    """(teacher ids, student ids) of the same token string (both are byte-level BPE)."""
    student = AutoTokenizer.from_pretrained(STUDENT_TOK)
    teacher = AutoTokenizer.from_pretrained(TEACHER_TOK)
    by_string = {t: i for i, t in enumerate(student.convert_ids_to_tokens(range(len(student))))}
    pairs = [(i, by_string[t]) for i, t in
             enumerate(teacher.convert_ids_to_tokens(range(len(teacher)))) if t in by_string]
    return tuple(np.asarray(ids) for ids in zip(*pairs))


def test_records_read_back_equal_the_teachers_distributions(collected):
    out, report, blocks, session = collected
    assert report["read"] == report["written"] == len(blocks) > 0
    rows = list(loader.make_loader(out, "train", batch_size=1, seq_len=96, shuffle=False,
                                   num_epochs=1, pack=False, prefetch=0, shard_index=0,
                                   shard_count=1))
    assert len(rows) == len(blocks)
    reference = _teacher_forward(load_model(ASSETS / "teacher", compute_dtype="float32", causal=True)[1])
    teacher_ids, student_ids = _teacher_to_student()
    student_tok = AutoTokenizer.from_pretrained(STUDENT_TOK)
    teacher_tok = AutoTokenizer.from_pretrained(TEACHER_TOK)
    mask_id, rejected_blocks = session.drafter.cfg.mask_token_id, 0
    for row, block in zip(rows, blocks):
        n = int(row["segment_ids"][0].sum())
        tokens, plen = row["tokens"][0, :n], int(row["prompt_mask"][0].sum())
        # The context is the drafter's, and spells the text the teacher verified so far.
        assert tokens[:plen].tolist() == block.student_context
        assert (student_tok.decode(tokens[:plen]) ==
                teacher_tok.decode(block.teacher_context, skip_special_tokens=True))
        kept = min(block.accepted + 1, len(block.teacher_draft))
        rejected_blocks += block.accepted < len(block.teacher_draft)
        assert tokens[plen:].tolist() == (block.student_draft[:kept]
                                          + [mask_id] * (GAMMA + TRAILING - kept))
        assert row["target_mask"][0, :n].tolist() == [False] * plen + [True] * kept + [False] * (
            GAMMA + TRAILING - kept)
        for j in range(kept):
            ref_t = reference(block.teacher_context + block.teacher_draft[:j])
            ref = np.zeros(len(student_tok))
            np.add.at(ref, student_ids, np.exp(ref_t[teacher_ids]))
            ids, lps = row["teacher_ids"][0, plen + j], row["teacher_logprobs"][0, plen + j]
            want = np.sort(ref)[::-1][:TOP_K]
            np.testing.assert_allclose(np.exp(lps), want, rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(np.exp(lps), ref[ids], rtol=1e-4, atol=1e-7)
            # the tail: the mass outside the top-k, unmapped teacher tokens included
            np.testing.assert_allclose(1 - np.exp(lps.astype(np.float64)).sum(),
                                       1 - want.sum(), atol=1e-5)
    assert rejected_blocks > 0  # blocks cut at a rejection were checked too


def test_string_strategy_is_refused():
    session = sp.Session(None, None, type("B", (), {"strategy": "string", "shared": False})(),
                         set())
    with pytest.raises(Exception, match="--strategy tli"):
        collect.HostLoopCollector(session, sp.Decoding())


# -- data.mix ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """Two datasets of disjoint examples over the same tokenizers."""
    root = str(tmp_path_factory.mktemp("mix"))
    teacher_dir, student_dir, recs = toy_teacher_records(root, random_examples(48, 3), seed=3)
    dirs = []
    for name, part in (("a", recs[:24]), ("b", recs[24:])):
        dump = write_json(os.path.join(root, f"{name}.jsonl"), part, jsonl=True)
        dirs.append(os.path.join(root, name))
        preprocess([dump], dirs[-1], Options(student_dir, teacher_dir, 64, 8,
                                             validation_fraction=0.0), workers=1)
    return dirs


def _mix_loader(dirs, weights, seed=0):
    return loader.make_loader(dirs[0], "train", batch_size=4, seq_len=64, seed=seed,
                              shard_index=0, shard_count=1, pack=False,
                              mix=tuple(zip(dirs, weights)))


def _batches(it, n):
    return [next(it) for _ in range(n)]


def test_mix_proportions_determinism_and_bit_exact_resume(two_datasets):
    from data_pipeline import records

    first = {tuple(ex["tokens"]) for ex in records.open_split(two_datasets[0], "train")}
    rows = [b["tokens"][i] for b in _batches(_mix_loader(two_datasets, (1.0, 3.0)), 50)
            for i in range(4)]
    from_first = sum(_row_in(r, first) for r in rows)
    assert from_first == 50  # weights 1 : 3 -> exactly every fourth example (grain's interleave)

    again = _batches(_mix_loader(two_datasets, (1.0, 3.0)), 6)
    it = _mix_loader(two_datasets, (1.0, 3.0))
    _batches(it, 3)
    state = it.get_state()
    resumed = _mix_loader(two_datasets, (1.0, 3.0))
    resumed.set_state(state)
    for want, got in zip(again[3:], _batches(resumed, 3)):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])
    other_seed = _batches(_mix_loader(two_datasets, (1.0, 3.0), seed=1), 6)
    assert any(not np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(again, other_seed))


def _row_in(row: np.ndarray, examples: set) -> bool:
    """A padded loader row holds one of `examples` (pad = 0 after the example's tokens)."""
    return any(len(ex) <= len(row) and tuple(row[:len(ex)]) == ex and not row[len(ex):].any()
               for ex in examples)


def _config(data_dir, *overrides):
    return train_config.apply_overrides(train_config.load_config_file("tiny"),
                                        [f"--config.data.dir={data_dir}", *overrides])


def test_mix_config_errors_name_the_field(two_datasets, tmp_path):
    a, b = two_datasets
    bad = _config(a, f"--config.data.mix=(('{a}', 1.0), ('{b}', 0.0), ('{tmp_path}', 2.0))")
    with pytest.raises(ConfigError) as err:
        train_config.validate(bad)
    message = str(err.value)
    assert f"data.mix weight 0.0 of {b} must be a finite number > 0" in message
    assert f"data.mix dataset '{tmp_path}' is not a `llada-jax preprocess` output" in message
    assert "set train.num_steps > 0" in message
    with pytest.raises(ConfigError, match=r"must be \(\(dataset dir, weight\), \.\.\.\) pairs"):
        train_config.validate(_config(a, f"--config.data.mix=('{a}',)"))


def test_mix_refuses_other_tokenizers(two_datasets, tmp_path):
    teacher_dir, student_dir, recs = toy_teacher_records(str(tmp_path), random_examples(8, 1))
    dump = write_json(str(tmp_path / "c.jsonl"), recs, jsonl=True)
    preprocess([dump], str(tmp_path / "c"), Options(student_dir, teacher_dir, 64, 8,
                                                    record_format=1), workers=1)
    config = _config(two_datasets[0], "--config.train.num_steps=10",
                     f"--config.data.mix=(('{two_datasets[1]}', 1.0), ('{tmp_path / 'c'}', 1.0))")
    with pytest.raises(ConfigError, match="record_format=1 but data.dir=.* has 2: mix only"):
        train_config.validate(config)


def test_onpolicy_plan_checks_the_steps_and_the_teacher(two_datasets):
    config = _config(two_datasets[0], "--config.train.num_steps=150", "--config.onpolicy.rounds=2")
    with pytest.raises(ConfigError) as err:
        rounds.plan(config)
    assert "train.num_steps=150 must be at least onpolicy.rounds x" in str(err.value)
    assert "onpolicy.teacher is empty" in str(err.value)
    ok = _config(two_datasets[0], "--config.train.num_steps=400", "--config.onpolicy.rounds=2",
                 "--config.onpolicy.teacher=T")
    assert rounds.plan(ok) == rounds.Plan(200, 100, 2)
    assert [rounds.plan(ok).end_of(s) for s in range(3)] == [200, 300, 400]


def test_cli_errors_exit_2_with_the_fix(two_datasets, tmp_path, capsys):
    from llada_jax import cli

    assert cli.main(["collect", "--drafter", str(ASSETS / "student"), "--teacher",
                     str(ASSETS / "teacher"), "--prompts", str(ASSETS / "prompts_train.txt"),
                     "--records", str(tmp_path / "r"), "--gamma", "0"]) == 2
    assert "need --gamma >= 1" in capsys.readouterr().err
    assert cli.main(["onpolicy", "--config", "tiny", "--workdir", str(tmp_path / "w"),
                     "--rounds", "3", "--steps-per-round", "50", "--teacher", "T",
                     f"--config.data.dir={two_datasets[0]}", "--config.train.num_steps=100"]) == 2
    err = capsys.readouterr().err
    assert "llada-jax onpolicy: invalid on-policy config" in err
    assert "train.num_steps=100 must be at least onpolicy.rounds x" in err
    assert not (tmp_path / "w").exists()  # refused before anything ran
