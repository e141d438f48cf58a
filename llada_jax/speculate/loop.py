"""Speculative decoding over prompts with the measures `llada-jax speculate` reports
(commands/speculate.py): LLaDA drafts, the causal teacher verifies, measured tokens per target call.

    llada-jax speculate --drafter CKPT_or_HF --teacher CKPT_or_HF --prompts FILE \
        [--drafter-tokenizer DIR] [--teacher-tokenizer DIR] --gamma 4 --steps 1 \
        --strategy tli|string [--temperature T | --greedy] [--out results.json]

Per block: the drafter fills γ positions (`draft`), the vocabulary bridge turns them into teacher
proposals (`vocab_bridge`), ONE teacher call scores them all and speculative sampling accepts a
prefix plus one teacher token (`rejection`). The output is the teacher's own law (greedy: its
own greedy text, token for token). Each prompt is also decoded by the teacher alone, in the same
run with the same verifier, for the wall-clock comparison (and, greedy, an equality check).

Strategy tli (with the cached verifier) runs the compiled, batched engine
(`llada_jax.speculate.engine`: --batch-size, --drafter-cache none|prefix, --refresh-every,
--refresh-tokens, --draft-confidence; `speedup` is against the engine's own teacher-only run,
--no-baseline skips it). Strategy string, or `--verifier recompute`, runs the host loop here:
the teacher verifies with a KV cache (`verify.CachedVerifier`) or reruns over the whole
sequence at every call (`verify.RecomputeVerifier`).

γ, steps and trailing masks default to the drafter's serving contract (drafter_contract.json,
written by `train` and carried by `export-hf`); `on_served` sees the settings served.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import numpy as np

from llada_jax import drafter_contract, reports
from llada_jax.checkpoints import load_model
from llada_jax.errors import SpeculateError
from llada_jax.speculate import rejection
from llada_jax.speculate.draft import Drafter
from llada_jax.speculate.measures import block_stats
from llada_jax.speculate.verify import make_verifier
from llada_jax.speculate.vocab_bridge import VocabBridge


# --gamma / --steps / --trailing-masks when the drafter has no serving contract
DEFAULTS = {"gamma": 4, "steps": 1, "trailing_masks": 4}


@dataclasses.dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 32
    greedy: bool = True
    temperature: float = 1.0  # the teacher's sampling temperature (ignored when greedy)

    def target_probs(self, logits: np.ndarray) -> np.ndarray:
        return logits if self.greedy else rejection.softmax(logits, self.temperature)


@dataclasses.dataclass(frozen=True)
class BlockScore:
    """One verified block: what the drafter saw and drafted (student ids), what the teacher saw
    and scored (teacher ids) and its logits float32 [len(teacher_draft) + 1, V_teacher] (row j:
    before teacher_draft[j]), and how many drafted tokens it accepted."""
    student_context: list[int]
    student_draft: list[int]
    teacher_context: list[int]
    teacher_draft: list[int]
    logits: np.ndarray
    accepted: int


def _cut_at_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    for k, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:k + 1]
    return tokens


def teacher_only(verifier, prompt_ids: list[int], decoding: Decoding, stop_ids: set[int],
                 rng: np.random.Generator) -> list[int]:
    """Plain decoding: one teacher call per token."""
    out: list[int] = []
    while len(out) < decoding.max_new_tokens and not (out and out[-1] in stop_ids):
        probs = decoding.target_probs(verifier.score(prompt_ids + out, [])[0])
        out.append(int(np.argmax(probs)) if decoding.greedy else rejection.sample(probs, rng))
    return out


def speculate_prompt(prompt: str, drafter: Drafter, verifier, bridge: VocabBridge,
                     decoding: Decoding, stop_ids: set[int], rng: np.random.Generator,
                     on_block=None) -> dict:
    """One prompt decoded speculatively: the teacher ids and what each block did.

    on_block(BlockScore), if given, sees every block as the teacher scored it (on-policy
    records: llada_jax/onpolicy/collect.py)."""
    prompt_ids = bridge.teacher_prompt(prompt)
    out: list[int] = []
    blocks = []  # (teacher tokens proposed, accepted)
    calls, passes = verifier.calls, drafter.forward_passes
    while len(out) < decoding.max_new_tokens and not (out and out[-1] in stop_ids):
        context = bridge.student_context(prompt, prompt_ids, out)
        draft = drafter.draft(context, rng)
        ids, q_rows = bridge.proposals(draft)
        room = decoding.max_new_tokens - len(out) - 1  # the teacher's own token always comes
        ids, q_rows = ids[:room], q_rows[:room]
        logits = verifier.score(prompt_ids + out, ids)
        p_rows = decoding.target_probs(logits)
        accepted, token = rejection.verify_block(p_rows, q_rows, ids, rng, decoding.greedy)
        if on_block is not None:
            on_block(BlockScore(context, draft.ids[:len(ids)], prompt_ids + out, ids, logits,
                                accepted))
        out += _cut_at_stop(ids[:accepted] + [token], stop_ids)
        blocks.append((len(ids), accepted))
    return {"ids": out, "blocks": blocks, "target_calls": verifier.calls - calls,
            "drafter_forward_passes": drafter.forward_passes - passes}


def run_prompts(prompts: list[str], drafter: Drafter, verifier, bridge: VocabBridge,
                decoding: Decoding, stop_ids: set[int], seed: int = 0) -> dict:
    """Speculative and teacher-only decoding of every prompt; per-prompt and total measures."""
    # Untimed warm-up on the first prompt: the timings below leave compilation out.
    speculate_prompt(prompts[0], drafter, verifier, bridge, decoding, stop_ids,
                     np.random.default_rng(seed))
    teacher_only(verifier, bridge.teacher_prompt(prompts[0]), decoding, stop_ids,
                 np.random.default_rng(seed))
    rows, all_blocks = [], []
    for i, prompt in enumerate(reports.progress(prompts, "speculate", "prompt")):
        t = time.perf_counter()
        spec = speculate_prompt(prompt, drafter, verifier, bridge, decoding, stop_ids,
                                np.random.default_rng([seed, i]))
        spec_s = time.perf_counter() - t
        calls = verifier.calls
        t = time.perf_counter()
        alone = teacher_only(verifier, bridge.teacher_prompt(prompt), decoding, stop_ids,
                             np.random.default_rng([seed, i, 1]))
        rows.append({"prompt": prompt, "teacher_tokens": len(spec["ids"]),
                     "target_calls": spec["target_calls"],
                     "tokens_per_target_call": len(spec["ids"]) / spec["target_calls"],
                     "drafter_forward_passes": spec["drafter_forward_passes"],
                     **block_stats(spec["blocks"]), "seconds": spec_s,
                     "teacher_only": {"teacher_tokens": len(alone), "target_calls":
                                      verifier.calls - calls, "seconds": time.perf_counter() - t},
                     "ids": spec["ids"], "text": bridge.text(spec["ids"]),
                     **({"equals_teacher_greedy": spec["ids"] == alone} if decoding.greedy else {})})
        all_blocks += spec["blocks"]
    return {"settings": {"gamma": drafter.gamma, "steps": drafter.steps,
                         "trailing_masks": drafter.trailing, "strategy": bridge.strategy,
                         "shared_vocab": bridge.shared, "greedy": decoding.greedy,
                         "temperature": decoding.temperature,
                         "draft_temperature": drafter.temperature,
                         "max_new_tokens": decoding.max_new_tokens, "seed": seed,
                         "intersection_size": bridge.intersection_size()},
            "summary": summarize(rows, all_blocks), "per_prompt": rows}


def summarize(rows: list[dict], blocks: list[tuple[int, int]]) -> dict:
    def total(key, sub=None):
        return sum((r[sub] if sub else r)[key] for r in rows)

    tokens, calls, seconds = total("teacher_tokens"), total("target_calls"), total("seconds")
    alone_tokens, alone_s = total("teacher_tokens", "teacher_only"), total("seconds", "teacher_only")
    stats = block_stats(blocks)
    stats["accepted_length_histogram"] = reports.accepted_histogram(stats.pop("accepted_per_block"))
    out = {"prompts": len(rows), "teacher_tokens": tokens, "target_calls": calls,
           "tokens_per_target_call": tokens / calls, **stats,
           "drafter_forward_passes": total("drafter_forward_passes"),
           "tokens_per_s": tokens / seconds, "teacher_only_tokens_per_s": alone_tokens / alone_s,
           "speedup": (tokens / seconds) / (alone_tokens / alone_s)}
    if rows and "equals_teacher_greedy" in rows[0]:
        out["all_equal_teacher_greedy"] = all(r["equals_teacher_greedy"] for r in rows)
    return out


def tensorboard_scalars(results: dict) -> list[tuple[str, float, int]]:
    """(tag, value, step) triples of a run's measures (metrics_writer.write_scalars)."""
    out = [(f"speculate/per_prompt/{key}", row[key], i)
           for i, row in enumerate(results["per_prompt"])
           for key in ("tokens_per_target_call", "mean_accepted_per_block", "teacher_tokens")]
    out += [(f"speculate/{key}", value, 0) for key, value in results["summary"].items()
            if isinstance(value, (int, float))]
    out += [("speculate/acceptance_by_offset", rate, j)
            for j, rate in enumerate(results["summary"]["acceptance_by_offset"]) if rate is not None]
    return out


# ----------------------------------------------------------------------------- the run

def _check_prompts(prompts: list[str], bridge: VocabBridge, max_new: int, max_length: int) -> None:
    for index, prompt in enumerate(prompts):
        n = len(bridge.teacher_prompt(prompt))
        if n == 0:
            raise SpeculateError(f"prompt {index} is empty for the teacher tokenizer (no BOS "
                                 f"either): give it some text")
        if n + max_new > max_length:
            raise SpeculateError(f"prompt {index} has {n} teacher tokens; with --max-new-tokens "
                                 f"{max_new} that passes the teacher's max_sequence_length "
                                 f"{max_length}: shorten it")


def _check_vocabularies(bridge: VocabBridge, student_cfg, teacher_cfg, drafter_tok: str,
                        teacher_tok: str) -> None:
    """Each tokenizer must be its model's (swapped ones run to garbage without this)."""
    from llada_jax.tokenizer_checks import vocab_problem

    problems = [vocab_problem(f"the drafter tokenizer {drafter_tok}", len(bridge.student),
                              student_cfg, "the drafter"),
                vocab_problem(f"the teacher tokenizer {teacher_tok}", len(bridge.teacher_hf),
                              teacher_cfg, "the teacher")]
    if any(problems):
        raise SpeculateError("; ".join(p for p in problems if p))


def _generation_eos(model_dir: str | None):
    """generation_config.json's eos_token_id (what transformers' generate stops at), if any."""
    path = pathlib.Path(model_dir or "") / "generation_config.json"
    return json.loads(path.read_text()).get("eos_token_id") if model_dir and path.is_file() else None


def tokenizer_dir(given: str | None, model_dir: str, flag: str) -> str:
    path = pathlib.Path(given or model_dir)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise SpeculateError(f"{path} holds no tokenizer (tokenizer.json): pass {flag} DIR")
    return str(path)


@dataclasses.dataclass(frozen=True)
class Session:
    """What decoding needs, built once for a set of prompts (`setup`)."""
    drafter: Drafter
    verifier: object  # verify.CachedVerifier | verify.RecomputeVerifier | None (the engine's)
    bridge: VocabBridge
    stop_ids: set[int]
    student: object = None  # the models themselves (the engine takes them)
    teacher: object = None


def setup(drafter_path: str | None, teacher_path: str | None, prompts: list[str], *,
          gamma: int = 4, steps: int = 1, trailing_masks: int = 4, strategy: str = "tli",
          decoding: Decoding = Decoding(), draft_temperature: float | None = None,
          drafter_tokenizer: str | None = None, teacher_tokenizer: str | None = None,
          drafter_model=None, teacher_model=None, verifier: str | None = "cached",
          teacher_dtype: str = "float32", on_served=None) -> Session:
    """Models (loaded, or passed in), vocabulary bridge, drafter and verifier (none when
    `verifier` is None) for `prompts`. `on_served(drafter_contract.Contract)` is called with the
    settings served, in the terms of the drafter's serving contract, before anything is decoded."""
    if not prompts:
        raise SpeculateError("no prompts to decode")
    teacher = (load_model(teacher_path, compute_dtype=teacher_dtype, causal=True,
                          role="--teacher")[1] if teacher_model is None else teacher_model)
    student = (load_model(drafter_path, causal=False, role="--drafter")[1]
               if drafter_model is None else drafter_model)
    teacher_tokenizer = tokenizer_dir(teacher_tokenizer, teacher_path, "--teacher-tokenizer")
    bridge = VocabBridge(tokenizer_dir(drafter_tokenizer, drafter_path, "--drafter-tokenizer"),
                         teacher_tokenizer, strategy, student_vocab_size=student.cfg.vocab_size,
                         teacher_vocab_size=teacher.cfg.vocab_size,
                         mask_token_id=student.cfg.mask_token_id)
    _check_vocabularies(bridge, student.cfg, teacher.cfg, drafter_tokenizer or drafter_path,
                        teacher_tokenizer or teacher_path)
    if on_served is not None:
        on_served(drafter_contract.served_contract(
            gamma=gamma, trailing_masks=trailing_masks, steps=steps,
            mask_token_id=student.cfg.mask_token_id, teacher_tokenizer=teacher_tokenizer,
            teacher_vocab=bridge.teacher, student_vocab=bridge.student))
    if draft_temperature is None:
        draft_temperature = 0.0 if decoding.greedy else decoding.temperature
    drafter = Drafter(student, bridge.allowed, gamma=gamma, steps=steps,
                      trailing_masks=trailing_masks, temperature=draft_temperature)
    _check_prompts(prompts, bridge, decoding.max_new_tokens, teacher.cfg.max_sequence_length)
    stop_ids = bridge.stop_ids(teacher.cfg.eos_token_id, _generation_eos(teacher_path))
    longest = max(len(bridge.teacher_prompt(p)) for p in prompts)
    made = (None if verifier is None
            else make_verifier(verifier, teacher, longest, decoding.max_new_tokens))
    return Session(drafter, made, bridge, stop_ids, student, teacher)


def speculate(drafter_path: str | None, teacher_path: str | None, prompts: list[str], *,
              decoding: Decoding = Decoding(), seed: int = 0, engine: dict | None = None,
              baseline: bool = True, **options) -> dict:
    """The subcommand as a function (demo, eval and bench call it); models may be passed in
    (`options`: setup's). Strategy tli with the cached verifier runs the compiled engine
    (llada_jax.speculate.engine; `engine`: extra EngineSettings fields, e.g. batch_size,
    drafter_cache, draft_confidence; `baseline`: also the engine's teacher-only run); `string`
    (or verifier "recompute") the host loop here."""
    use_engine = (options.get("strategy", "tli") == "tli"
                  and options.get("verifier", "cached") == "cached")
    if use_engine:
        options = {**options, "verifier": None}  # the engine keeps its own teacher cache
    session = setup(drafter_path, teacher_path, prompts, decoding=decoding, **options)
    if use_engine:
        from llada_jax.speculate.engine import EngineSettings
        from llada_jax.speculate.run import engine_results

        d = session.drafter
        settings = EngineSettings(gamma=d.gamma, trailing_masks=d.trailing, steps=d.steps,
                                  greedy=decoding.greedy, temperature=decoding.temperature,
                                  draft_temperature=d.temperature,
                                  max_new_tokens=decoding.max_new_tokens, seed=seed,
                                  **(engine or {}))
        return engine_results(prompts, session.student, session.teacher, session.bridge,
                              settings, session.stop_ids, baseline)
    return run_prompts(prompts, session.drafter, session.verifier, session.bridge, decoding,
                       session.stop_ids, seed)
