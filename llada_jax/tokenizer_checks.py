"""Does a tokenizer belong to a model? Its size must fit the model's vocabulary, which may pad
the tokenizer's ids by a few percent but never holds fewer. And is a model the right kind for its
role (a LLaDA student, a causal teacher)?"""

from __future__ import annotations


# A model's vocab_size may pad its tokenizer's ids up to a round number (LLaDA: 126464 for
# 126349 ids, Qwen2: 151936 for 151665): a few percent at most. More unused rows than this
# means another tokenizer.
MAX_PADDING = 0.05


def vocab_problem(flag: str, tokenizer_size: int, cfg, model: str) -> str | None:
    """Why the tokenizer given as `flag` cannot be `model`'s (e.g. "the teacher"), naming both
    sizes; None when it fits."""
    if tokenizer_size > cfg.vocab_size or tokenizer_size < (1 - MAX_PADDING) * cfg.vocab_size:
        return (f"{flag} has {tokenizer_size} ids but {model} has vocab_size {cfg.vocab_size}: "
                f"they do not belong together (swapped tokenizers?); pass {model}'s own tokenizer")
    return None


def student_kind_problem(what: str, cfg) -> str | None:
    """A causal LM given where the LLaDA student (or drafter) belongs: it would run, unmasked,
    and give meaningless drafts."""
    if cfg.causal or cfg.model_type == "llama":
        return (f"{what} is a causal LLaMA model; the student must be a LLaDA (masked-diffusion) "
                f"checkpoint")
    return None
