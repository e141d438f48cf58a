"""Length buckets: inputs are padded up to a multiple of a bucket so that few shapes compile.

PROMPT_BUCKET: prompt lengths (teacher generation and the verifier's prefill). LENGTH_BUCKET:
the drafter's and the recomputing verifier's whole input. WIDTH_BUCKET: the rows read out of a
forward (drafted block, verify extend).
"""

from __future__ import annotations

PROMPT_BUCKET = 16
LENGTH_BUCKET = 32
WIDTH_BUCKET = 8


def bucket(n: int, size: int) -> int:
    """n rounded up to a multiple of size."""
    return -(-n // size) * size
