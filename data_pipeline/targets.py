"""Teacher targets for one position, in the student's vocabulary: top-k ids + log-probs.

- Full logits [V_teacher]: log-softmax over the teacher's whole vocabulary in float64, teacher
  probabilities summed onto the student id each teacher id maps to (several teacher ids may map
  to one student id), the k largest kept. Mass on unmapped ids and outside the top-k is the tail:
  p_tail = 1 - sum(exp(logprobs)), known.
- Only top-5: softmax over the five mapped logits, renormalised over the mapped ones (the tail is
  unknown and treated as zero).
`mass_kept` is the share of the teacher's probability that landed on student ids (before top-k).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Target:
    ids: np.ndarray        # int32 [k'], student ids, log-probs descending
    logprobs: np.ndarray   # float32 [k']
    tail_known: bool
    mass_kept: float


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def _top(values: np.ndarray, top_k: int) -> np.ndarray:
    """Indices of the `top_k` largest values, largest first (ties: lower index first)."""
    if values.size > top_k:
        idx = np.argpartition(-values, top_k - 1)[:top_k]
    else:
        idx = np.arange(values.size)
    return idx[np.lexsort((idx, -values[idx]))]


def from_full_logits(logits: np.ndarray, id_map: np.ndarray | None, student_size: int,
                     top_k: int, mapped: np.ndarray | None = None) -> Target:
    """logits float [V_teacher]; id_map int32 [V_teacher] (-1 unmapped), None for identity:
    teacher id i is student id i, and ids >= student_size (a padded teacher vocabulary) are
    unmapped. mapped: np.flatnonzero(id_map >= 0), when the caller keeps it.

    Three passes over the row (max, exp, sum; in float64): log p = (x - max) - log(sum), and the
    top-k / id merge only look at the entries they need."""
    x = np.asarray(logits, np.float64)
    shifted = x - x.max()
    if id_map is None:
        kept = shifted[:student_size]
        top = _top(kept, top_k)
        exp = np.exp(shifted)
        total = exp.sum()
        mass = 1.0 if kept.size == shifted.size else float(exp[:student_size].sum() / total)
        return Target(top.astype(np.int32), (kept[top] - np.log(total)).astype(np.float32),
                      True, mass)
    if mapped is None:
        mapped = np.flatnonzero(id_map >= 0)
    exp = np.exp(shifted, out=shifted)
    total = exp.sum()
    mass = np.bincount(id_map[mapped], weights=exp[mapped], minlength=student_size) / total
    top = _top(mass, top_k)
    top = top[mass[top] > 0]
    return Target(top.astype(np.int32), np.log(mass[top]).astype(np.float32), True,
                  float(mass.sum()))


def from_top5(student_ids: np.ndarray, logits: np.ndarray, top_k: int) -> Target | None:
    """student_ids int [n] (-1 unmapped), logits float [n]: renormalised over the mapped ones.

    None when no candidate maps to the student vocabulary."""
    probs = np.exp(log_softmax(logits))
    mapped = student_ids >= 0
    kept = float(probs[mapped].sum())
    if not mapped.any() or kept <= 0.0:
        return None
    uniq, inverse = np.unique(student_ids[mapped], return_inverse=True)
    merged = np.bincount(inverse, weights=probs[mapped]) / kept
    top = _top(merged, top_k)
    top = top[merged[top] > 0]  # a candidate whose probability underflowed carries no mass
    return Target(uniq[top].astype(np.int32), np.log(merged[top]).astype(np.float32), False, kept)
