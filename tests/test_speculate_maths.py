"""Speculative sampling maths: exact enumeration of the output law, and a seeded block test."""

import numpy as np
import pytest
from scipy import stats

from llada_jax.speculate import rejection

V = 6


def _dist(rng, zeros=()):
    x = rng.gamma(0.5, size=V)
    x[list(zeros)] = 0.0
    return x / x.sum()


def _output_law(p, q):
    """P(emitted = y) from the module's accept and residual rules, enumerated over x ~ q."""
    residual = rejection.residual_distribution(p, q)
    law = np.zeros(V)
    for x in np.flatnonzero(q):
        a = rejection.acceptance_probability(p, q, int(x))
        law[x] += q[x] * a
        law += q[x] * (1.0 - a) * residual
    return law


@pytest.mark.parametrize("case", ["random", "q_misses_tokens", "point_mass", "p_equals_q"])
def test_output_law_is_exactly_the_target(case):
    rng = np.random.default_rng(3)
    for _ in range(20):
        p = _dist(rng)
        q = {"random": lambda: _dist(rng),
             "q_misses_tokens": lambda: _dist(rng, zeros=(0, 2)),  # TLI: tokens q cannot draft
             "point_mass": lambda: rejection.point_mass(int(rng.integers(V)), V),
             "p_equals_q": lambda: p.copy()}[case]()
        np.testing.assert_allclose(_output_law(p, q), p, rtol=0, atol=1e-12)


# A Markov "teacher" p(next | prev) and a different Markov "drafter" q(next | prev).
def _markov(seed):
    rng = np.random.default_rng(seed)
    return np.stack([_dist(rng) for _ in range(V)])


def _speculative_pair(P, Q, rng, gamma, start=0):
    """The first two tokens a speculative block step emits from context `start`."""
    out = []
    while len(out) < 2:
        prev = out[-1] if out else start
        draft, q_rows = [], []
        for _ in range(gamma):
            q = Q[draft[-1] if draft else prev]
            draft.append(rejection.sample(q, rng))
            q_rows.append(q)
        ctx = [prev] + draft
        p_rows = np.stack([P[t] for t in ctx])
        n, nxt = rejection.verify_block(p_rows, q_rows, draft, rng, greedy=False)
        out += draft[:n] + [nxt]
    return out[0] * V + out[1]


def _chi2_pvalue(counts, expected_probs):
    return stats.chisquare(counts, expected_probs * counts.sum()).pvalue


@pytest.mark.parametrize("gamma", [1, 3])
def test_block_sampling_matches_the_target_joint_law(gamma):
    P, Q = _markov(1), _markov(2)
    rng = np.random.default_rng(0)
    n = 6000
    counts = np.bincount([_speculative_pair(P, Q, rng, gamma) for _ in range(n)],
                         minlength=V * V)
    exact = (P[0][:, None] * P).ravel()  # p(x1 | 0) p(x2 | x1)
    assert _chi2_pvalue(counts, exact) > 1e-3
    # The test has power: the drafter's own joint law is rejected on the same counts.
    assert _chi2_pvalue(counts, (Q[0][:, None] * Q).ravel()) < 1e-6


def test_greedy_accepts_exact_matches_then_the_target_token():
    p_rows = np.eye(V)[[1, 2, 3, 4]]
    assert rejection.verify_block(p_rows, [None] * 3, [1, 2, 5], None, greedy=True) == (2, 3)
    assert rejection.verify_block(p_rows, [None] * 3, [1, 2, 3], None, greedy=True) == (3, 4)
