"""generate-teacher: records checked against an independent rerun of the teacher, stop, sampling, CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from llada_jax import cli
from llada_jax.teacher import generate as gt
from llada_jax.checkpoints import save_params
from llada_jax.model.config import ModelConfig
from llada_jax.model.modeling import LLaDAModel

TEXT = ["In the beginning God created the heaven and the earth.",
        "And the earth was without form, and void; and darkness was upon the face of the deep.",
        "And God said, Let there be light: and there was light.",
        "And God saw the light, that it was good: and God divided the light from the darkness."]
PROMPTS = ["And God said", "In the", "And the earth was without form, and void; and darkness",
           "Let there be light"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
                 "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
                 "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
                 "{% endif %}")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(checkpoint dir, tokenizer dir): a random causal GQA model, a byte-level BPE with BOS."""
    root = tmp_path_factory.mktemp("teacher")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT * 4, trainers.BpeTrainer(
            vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                            "<|end_header_id|>"], show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                            eos_token="<|eot_id|>", pad_token="<|eot_id|>",
                            chat_template=CHAT_TEMPLATE).save_pretrained(str(root / "tok"))
    vocab = tok.get_vocab_size()
    # embedding_size > vocab_size: the padded ids must never appear in the records.
    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64,
                      vocab_size=vocab, embedding_size=vocab + 12, eos_token_id=1, pad_token_id=1,
                      mask_token_id=1, causal=True, dtype="float32", max_sequence_length=128)
    save_params(root / "ckpt", LLaDAModel(cfg, rngs=nnx.Rngs(3)))
    return root / "ckpt", root / "tok"


@pytest.fixture(scope="module")
def loaded(teacher):
    return gt.load_teacher(*teacher)


RERUN_LENGTH = 64


def _rerun_logits(model, ids):
    """float32 [len(ids), vocab_size]: the teacher's next-token logits after each prefix of `ids`.

    One teacher-forced forward, right-padded to a fixed length (causal attention: padding after
    a position cannot change it), positions from 0: none of generate_teacher's left padding.
    """
    tokens = np.zeros((1, RERUN_LENGTH), np.int32)
    tokens[0, :len(ids)] = ids
    logits = _forward(nnx.split(model), jnp.asarray(tokens))
    return np.asarray(logits[0, :len(ids), :model.cfg.vocab_size])


@jax.jit
def _forward(split, tokens_bl):
    return nnx.merge(*split)(tokens_bl)


def _check_against_rerun(model, tok, record, prompt_ids, greedy):
    chosen = [e["chosen_token_id"] for e in record["logits"]]
    assert tok.decode(chosen, skip_special_tokens=False) == record["response"]
    all_logits = _rerun_logits(model, prompt_ids + chosen)
    for i, entry in enumerate(record["logits"]):
        assert entry["position"] == i
        logits = all_logits[len(prompt_ids) + i - 1]  # after prompt + chosen[:i]
        want = np.argsort(-logits, kind="stable")[:5]
        assert [t["token_id"] for t in entry["top_5"]] == want.tolist()
        np.testing.assert_allclose([t["logit"] for t in entry["top_5"]], logits[want], atol=1e-4)
        assert [t["token"] for t in entry["top_5"]] == [tok.decode([int(j)]) for j in want]
        assert entry["chosen_token"] == tok.decode([entry["chosen_token_id"]])
        if greedy:
            assert entry["chosen_token_id"] == int(np.argmax(logits))
        if "full_logits" in entry:
            assert len(entry["full_logits"]) == model.cfg.vocab_size
            np.testing.assert_allclose(entry["full_logits"], logits, atol=1e-4)


def test_greedy_records_match_an_independent_rerun(loaded):
    model, tok = loaded
    # batch_size 3 over 4 prompts of different lengths: left padding and a partial last batch.
    records = list(gt.generate_records(model, tok, PROMPTS, gt.Sampling(max_new_tokens=6),
                                       batch_size=3, full_logits=True))
    assert [r["prompt"] for r in records] == PROMPTS
    for prompt, record in zip(PROMPTS, records):
        assert len(record["logits"]) == 6  # a random model does not stop early here
        _check_against_rerun(model, tok, record, tok(prompt)["input_ids"], greedy=True)


def test_sampled_records_are_reproducible_and_still_true_top5(loaded):
    model, tok = loaded
    sampling = gt.Sampling(max_new_tokens=5, temperature=1.5, top_p=0.95, seed=7)
    first = list(gt.generate_records(model, tok, PROMPTS[:2], sampling, batch_size=2))
    again = list(gt.generate_records(model, tok, PROMPTS[:2], sampling, batch_size=2))
    assert first == again
    other = list(gt.generate_records(model, tok, PROMPTS[:2],
                                     gt.Sampling(5, 1.5, 0.95, seed=8), batch_size=2))
    assert other != first
    for prompt, record in zip(PROMPTS, first):
        assert all("full_logits" not in e for e in record["logits"])
        _check_against_rerun(model, tok, record, tok(prompt)["input_ids"], greedy=False)


def test_stops_at_eos_and_includes_it(teacher, loaded):
    model, tok = loaded
    greedy = next(gt.generate_records(model, tok, PROMPTS[:1], gt.Sampling(max_new_tokens=6)))
    ids = [e["chosen_token_id"] for e in greedy["logits"]]
    # Declare the 3rd greedy token the model's eos: generation must end right after it.
    model.cfg = model.cfg.replace(eos_token_id=ids[2])
    try:
        record = next(gt.generate_records(model, tok, PROMPTS[:1], gt.Sampling(max_new_tokens=6)))
    finally:
        model.cfg = model.cfg.replace(eos_token_id=1)
    assert [e["chosen_token_id"] for e in record["logits"]] == ids[:ids.index(ids[2]) + 1]
    assert record["response"] == tok.decode(ids[:ids.index(ids[2]) + 1])


def test_top_p_sampling_draws_from_the_renormalised_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(np.tile(probs, (20000, 1)), jnp.float32))
    # Mass before token 1 is 0.5 < 0.7 (kept); before token 2 it is 0.8 (cut).
    draws = np.asarray(gt.sample_next(logits, jax.random.key(0), temperature=1.0, top_p=0.7))
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.015)
    # Temperature 2 flattens before the cut: p ∝ sqrt(probs) over all four at top_p 1.
    draws = np.asarray(gt.sample_next(logits, jax.random.key(1), temperature=2.0, top_p=1.0))
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / len(draws),
                               np.sqrt(probs) / np.sqrt(probs).sum(), atol=0.015)


def test_chat_template_prompt_is_the_templated_text(loaded):
    model, tok = loaded
    record = next(gt.generate_records(model, tok, ["Let there be light"],
                                      gt.Sampling(max_new_tokens=3), chat_template=True))
    assert record["prompt"] == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                                "Let there be light<|eot_id|><|start_header_id|>assistant"
                                "<|end_header_id|>\n\n")
    ids = tok(record["prompt"], add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1
    _check_against_rerun(model, tok, record, ids, greedy=True)


def test_bad_prompt_files_name_the_line(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n\n{"text": "no prompt"}\n')
    with pytest.raises(gt.GenerateError, match=r"p.jsonl:3: expected an object with a string"):
        list(gt.read_prompts([bad]))
    bad.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(gt.GenerateError, match=r"p.jsonl:2: not valid JSON"):
        list(gt.read_prompts([bad]))
    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\n second, kept as is \n")
    array = tmp_path / "q.json"
    array.write_text('[{"prompt": "third"}]')
    assert list(gt.read_prompts([text, array])) == ["first prompt", " second, kept as is ", "third"]


def test_cli_writes_json_array_and_jsonl_alike(teacher, loaded, tmp_path):
    ckpt, tok_dir = teacher
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:3]))
    args = ["generate-teacher", "--teacher", str(ckpt), "--tokenizer", str(tok_dir),
            "--prompts", str(prompts), "--max-new-tokens", "4", "--batch-size", "2", "--greedy"]
    # The console entry point in a fresh process writes the JSON array ...
    proc = subprocess.run([sys.executable, "-m", "llada_jax", *args, "--out", str(tmp_path / "t.json")],
                          capture_output=True, text=True, env=dict(os.environ, XLA_FLAGS=""),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote 3 records to {tmp_path / 't.json'}" in proc.stdout
    # ... and the same parser in this process the JSONL: the same records.
    assert cli.main([*args, "--out", str(tmp_path / "t.jsonl")]) == 0
    array = json.loads((tmp_path / "t.json").read_text())
    lines = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert array == lines and [r["prompt"] for r in array] == PROMPTS[:3]
    model, tok = loaded
    _check_against_rerun(model, tok, array[2], tok(PROMPTS[2])["input_ids"], greedy=True)


def test_cli_rejects_contradictory_options(teacher, tmp_path, capsys):
    ckpt, tok_dir = teacher
    (tmp_path / "p.txt").write_text("hello\n")
    args = ["generate-teacher", "--teacher", str(ckpt), "--tokenizer", str(tok_dir),
            "--prompts", str(tmp_path / "p.txt")]
    assert cli.main(args + ["--out", str(tmp_path / "o.json"), "--greedy",
                            "--temperature", "0.7"]) == 2
    assert "contradict" in capsys.readouterr().err
    assert cli.main(args + ["--out", str(tmp_path / "o.txt")]) == 2
    assert "must end in .json or .jsonl" in capsys.readouterr().err
