"""Speculative decoding: LLaDA drafts (`draft`), the vocabulary bridge turns drafts into teacher
proposals (`vocab_bridge`), the cached teacher verifies (`verify`), speculative sampling accepts
(`rejection`), and `loop` runs it over prompts with the measures `speculate` reports; `engine`
runs the same, compiled and batched (strategy tli), with `step` (device maths), `context` (the
drafter's context per row) and `run` (its results in `speculate`'s JSON)."""
