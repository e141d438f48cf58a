"""Speculative sampling maths (Leviathan et al. 2023; Chen et al. 2023), float64 NumPy.

For a drafted block x_0..x_{n-1}, each x_j drawn from q_j, and the target's next-token
distributions p_0..p_n (p_j conditioned on x_{<j}): token j is accepted with probability
min(1, p_j(x_j) / q_j(x_j)); at the first rejection the target's token is drawn from
norm(max(0, p_j - q_j)) and the block ends; if all n are accepted, a bonus token is drawn from
p_n. Each emitted token is then distributed exactly as p: q(y) min(1, p(y)/q(y)) + (1 - α) *
residual(y) = min(q, p)(y) + max(0, p - q)(y) = p(y), with α = Σ min(p, q).

A proposal whose law is unknown (a re-tokenised string, or a token committed out of order by
the diffusion drafter) is verified with the point mass q = δ_x: it is accepted with probability
p(x) and a rejection draws from p with x removed, which is again exactly p whatever x was.
Greedy mode: a token is accepted iff it is the target's argmax; the target's argmax follows.
"""

from __future__ import annotations

import numpy as np


def softmax(logits_v: np.ndarray, temperature: float) -> np.ndarray:
    """float64 softmax(logits / temperature) over the last axis; -inf logits get probability 0."""
    z = np.asarray(logits_v, np.float64) / temperature
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=-1, keepdims=True)


def point_mass(token: int, vocab_size: int) -> np.ndarray:
    q = np.zeros(vocab_size, np.float64)
    q[token] = 1.0
    return q


def acceptance_probability(p_v: np.ndarray, q_v: np.ndarray, token: int) -> float:
    """min(1, p(x) / q(x)) for a token x drawn from q (so q(x) > 0)."""
    return float(min(1.0, p_v[token] / q_v[token]))


def residual_distribution(p_v: np.ndarray, q_v: np.ndarray) -> np.ndarray:
    """norm(max(0, p - q)): where the target's token comes from after a rejection.

    The sum is 1 - α > 0 whenever a rejection can happen; when p == q up to rounding (a
    rejection of probability ~0), p itself is returned.
    """
    r = np.maximum(p_v - q_v, 0.0)
    total = r.sum()
    return r / total if total > 1e-12 else p_v


def sample(probs_v: np.ndarray, rng: np.random.Generator) -> int:
    """One draw by inverse CDF (stable for float64 probabilities that sum to ~1)."""
    cdf = np.cumsum(probs_v)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


def verify_block(p_rows: np.ndarray, q_rows: list[np.ndarray | None], draft: list[int],
                 rng: np.random.Generator | None, greedy: bool) -> tuple[int, int]:
    """(number of draft tokens accepted, the target's own next token).

    p_rows float64 [n + 1, V] target probabilities (greedy: any scores, argmax is used);
    q_rows[j] the law x_j was drawn from, or None for a proposal verified as a point mass.
    """
    for j, token in enumerate(draft):
        p = p_rows[j]
        if greedy:
            best = int(np.argmax(p))
            if token != best:
                return j, best
            continue
        q = point_mass(token, len(p)) if q_rows[j] is None else q_rows[j]
        if rng.random() >= acceptance_probability(p, q, token):
            return j, sample(residual_distribution(p, q), rng)
    last = p_rows[len(draft)]
    return len(draft), int(np.argmax(last)) if greedy else sample(last, rng)
