"""Speculative decoding: LLaDA drafts (`draft`), the vocabulary bridge turns drafts into teacher
proposals (`vocab_bridge`), the cached teacher verifies (`verify`), speculative sampling accepts
(`rejection`), and `loop` runs it over prompts with the measures `speculate` reports."""
