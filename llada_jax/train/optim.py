"""Optimizer: AdamW (no decay on norm weights), warmup + linear decay, global-norm clipping.

Defaults follow the original trainer (lr 2.5e-5, weight decay 0.1, warmup 50 steps) but, unlike
it, the clipping norm and the schedule are actually applied.
"""

from __future__ import annotations

import jax
import ml_collections
import optax


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> lr over `warmup_steps`, then linear decay to `final_lr_fraction * lr`."""
    warmup = max(int(optim.warmup_steps), 0)
    decay_steps = max(int(total_steps) - warmup, 1)
    peak = float(optim.lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup, 1)),
         optax.linear_schedule(peak, peak * float(optim.final_lr_fraction), decay_steps)],
        boundaries=[warmup])


def decay_mask(params) -> object:
    """True for weights that get weight decay: every matrix; norm scales (1-D per layer) do not.

    Works on the stacked-layer layout too: a stacked norm weight is [n_layers, D] but its path
    names a norm, so the decision is made on the path, not only on ndim.
    """
    def wants_decay(path, leaf) -> bool:
        names = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path).lower()
        return "norm" not in names and getattr(leaf, "ndim", 0) >= 2

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(optim, total_steps)
    return optax.chain(
        optax.clip_by_global_norm(float(optim.max_grad_norm)),
        optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                    weight_decay=float(optim.weight_decay), mask=decay_mask),
    )
