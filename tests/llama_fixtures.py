"""Tiny random LlamaForCausalLM directories made by transformers itself (offline), for tests."""

from __future__ import annotations

import json
import pathlib

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# name -> (LlamaConfig kwargs, config.json form): every RoPE type we compute, GQA, tied/untied,
# an original context (16) shorter than the sequences the tests run.
CONFIGS = {
    "untied_llama3_f8_gqa_4x": (dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        rope_theta=500000.0), "4.x"),
    "tied_llama3_f32_5x": (dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        rope_theta=500000.0), "5.x"),
    "linear_mha_5x": (dict(num_attention_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0},
                           rope_theta=10000.0), "5.x"),
}


def llama_config(**changes) -> LlamaConfig:
    kwargs = dict(vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    kwargs.update(changes)
    return LlamaConfig(**kwargs)


def random_llama(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """fp32 LlamaForCausalLM with O(1) activations and logits (1/sqrt(fan_in) weights)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    return model


def write_llama_dir(path: pathlib.Path, config: LlamaConfig, form: str = "5.x",
                    seed: int = 0, **save_kwargs) -> pathlib.Path:
    """save_pretrained of a random model; form "4.x" rewrites config.json the way transformers 4
    wrote it (`rope_scaling` + top-level `rope_theta`), as published LLaMA-3 configs are."""
    random_llama(config, seed).save_pretrained(path, **save_kwargs)
    if form == "4.x":
        cfg_path = path / "config.json"
        hf = json.loads(cfg_path.read_text())
        rope = hf.pop("rope_parameters")
        hf["rope_theta"] = rope.pop("rope_theta")
        hf["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
        hf["transformers_version"] = "4.46.3"
        cfg_path.write_text(json.dumps(hf, indent=2))
    return path


def hf_logits(hf_dir: pathlib.Path, tokens, dtype=torch.float32, attention_mask=None):
    """transformers' own forward on the saved directory (eager attention), logits as float32."""
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(torch.as_tensor(tokens).long(), attention_mask=attention_mask)
    return out.logits.float().numpy()


TEXT = ["the cat sat on the mat and the dog sat on the log",
        "a quick brown fox jumps over the lazy dog near the river bank"]


def write_llama_teacher(root: pathlib.Path, seed: int = 3, vocab_multiple: int = 1, **changes):
    """(HF dir, tokenizer): a random LlamaForCausalLM (untied, llama3 x8, GQA, 4.x config.json;
    `changes` to its LlamaConfig) with a byte-level BPE tokenizer (BOS added, eos <|eot_id|> =
    2) saved next to it; reserved special tokens (as LLaMA-3 has) round its vocabulary up to a
    multiple of `vocab_multiple` (a mesh's tensor axis splits the vocabulary)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Only the characters of TEXT (no byte alphabet): every id decodes to whole characters, so
    # a random model's output is valid text that preprocess can align.
    tok.train_from_iterator(TEXT * 4, trainers.BpeTrainer(
            vocab_size=320, special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
            show_progress=False))
    reserved = -tok.get_vocab_size() % vocab_multiple
    tok.add_special_tokens([f"<|reserved_special_token_{i}|>" for i in range(reserved)])
    tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                     eos_token="<|eot_id|>", pad_token="<|end_of_text|>")
    kwargs, _ = CONFIGS["untied_llama3_f8_gqa_4x"]
    config = llama_config(**kwargs | dict(vocab_size=len(hf_tok), bos_token_id=0,
                                          eos_token_id=2, pad_token_id=1) | changes)
    write_llama_dir(root, config, "4.x", seed=seed)
    hf_tok.save_pretrained(str(root))
    return root, hf_tok


def hf_greedy(hf_dir: pathlib.Path, tok, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """transformers' own greedy `generate` continuation (ids after the prompt) of each prompt:
    the reference speculative decoding must equal (eos 2 and pad 1, as write_llama_teacher)."""
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    out = []
    for prompt in prompts:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            tokens = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, eos_token_id=2, pad_token_id=1)
        out.append(tokens[0, ids.shape[1]:].tolist())
    return out
