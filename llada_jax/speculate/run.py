"""`speculate`'s results from the engine: the JSON the host loop wrote (same keys), now with the
engine's own teacher-only run as the baseline (`speedup`), or none (`baseline=False`)."""

from __future__ import annotations

from llada_jax.speculate.measures import block_stats
from llada_jax.speculate.context import EngineBridge
from llada_jax.speculate.engine import EngineSettings, SpeculativeEngine


def engine_results(prompts: list[str], student, teacher, vocab_bridge, settings: EngineSettings,
                   stop_ids: set[int], baseline: bool = True, mesh=None) -> dict:
    """Speculative decoding of `prompts` by the engine (+ its teacher-only run): per-prompt
    rows and a summary with the keys `speculate` always wrote."""
    engine = SpeculativeEngine(student, teacher, EngineBridge.from_vocab_bridge(vocab_bridge),
                               settings, mesh=mesh, stop_ids=stop_ids)
    spec = engine.generate(prompts)
    alone = engine.teacher_only(prompts) if baseline else [None] * len(prompts)
    rows = [_row(prompt, s, a, vocab_bridge, settings.greedy)
            for prompt, s, a in zip(prompts, spec, alone)]
    blocks = [b for s in spec for b in s["blocks"]]
    return {"settings": {"gamma": settings.gamma, "steps": settings.steps,
                         "trailing_masks": settings.trailing_masks, "strategy": vocab_bridge.strategy,
                         "shared_vocab": vocab_bridge.shared, "greedy": settings.greedy,
                         "temperature": settings.temperature,
                         "draft_temperature": settings.draft_t,
                         "max_new_tokens": settings.max_new_tokens, "seed": settings.seed,
                         "intersection_size": vocab_bridge.intersection_size(), "engine": True,
                         "batch_size": settings.batch_size, "drafter_cache": settings.drafter_cache,
                         "refresh_every": settings.refresh_every,
                         "refresh_tokens": settings.refresh_tokens,
                         "draft_confidence": settings.draft_confidence,
                         "compile_seconds": engine.compile_seconds},
            "summary": summarize(rows, blocks), "per_prompt": rows}


def _row(prompt: str, spec: dict, alone: dict | None, bridge, greedy: bool) -> dict:
    n = len(spec["ids"])
    row = {"prompt": prompt, "teacher_tokens": n, "target_calls": spec["target_calls"],
           "tokens_per_target_call": n / spec["target_calls"],
           "drafter_forward_passes": spec["drafter_forward_passes"],
           **block_stats(spec["blocks"]), "seconds": spec["seconds"],
           "ids": spec["ids"], "text": bridge.text(spec["ids"])}
    if alone is not None:
        row["teacher_only"] = {"teacher_tokens": len(alone["ids"]),
                               "target_calls": alone["target_calls"], "seconds": alone["seconds"]}
        if greedy:
            row["equals_teacher_greedy"] = spec["ids"] == alone["ids"]
    return row


def summarize(rows: list[dict], blocks: list[tuple[int, int]]) -> dict:
    """The host loop's summary keys; without a baseline, no teacher-only rate or speedup."""
    tokens = sum(r["teacher_tokens"] for r in rows)
    calls = sum(r["target_calls"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    stats = block_stats(blocks)
    del stats["accepted_per_block"]
    out = {"prompts": len(rows), "teacher_tokens": tokens, "target_calls": calls,
           "tokens_per_target_call": tokens / calls, **stats,
           "drafter_forward_passes": sum(r["drafter_forward_passes"] for r in rows),
           "tokens_per_s": tokens / seconds}
    if rows and "teacher_only" in rows[0]:
        alone_tokens = sum(r["teacher_only"]["teacher_tokens"] for r in rows)
        alone_s = sum(r["teacher_only"]["seconds"] for r in rows)
        out["teacher_only_tokens_per_s"] = alone_tokens / alone_s
        out["speedup"] = out["tokens_per_s"] / out["teacher_only_tokens_per_s"]
    if rows and "equals_teacher_greedy" in rows[0]:
        out["all_equal_teacher_greedy"] = all(r["equals_teacher_greedy"] for r in rows)
    return out
