"""What a speculative run's blocks measure (the host loop and the engine report the same)."""

from __future__ import annotations

import numpy as np


def block_stats(blocks: list[tuple[int, int]]) -> dict:
    """Accepted length per block, and the acceptance rate at each offset j of the drafted block
    among the blocks that reached it (drafted > j tokens and accepted the first j)."""
    longest = max((n for n, _ in blocks), default=0)
    tried = [sum(n > j and a >= j for n, a in blocks) for j in range(longest)]
    took = [sum(a > j for _, a in blocks) for j in range(longest)]
    return {"accepted_per_block": [a for _, a in blocks],
            "mean_accepted_per_block": float(np.mean([a for _, a in blocks])) if blocks else 0.0,
            "acceptance_by_offset": [k / t if t else None for k, t in zip(took, tried)]}
