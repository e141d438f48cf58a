"""The training recipes `demo --compare-strategies` compares: config overrides on top of the
demo's tiny config, each a loss kind, position weights, mask mode and vocabulary restriction.

BASELINE is the shipped default (original masking + KL); the demo reports every recipe's ratio
to it. draft_blocks masks and scores only a drafted block (as speculate drafts), _dense also
scores the visible prefix (as the original counts visible positions), _mixed is _dense plus the
trailing masks with half the segments left to the original masking (masking.draft_blocks).
"""

_DB = ("--config.loss.mask_mode=draft_blocks",)
_DENSE = _DB + ("--config.loss.draft_score_prefix=True",)
_MIXED = _DENSE + ("--config.loss.draft_score_trailing=True",
                   "--config.loss.draft_original_fraction=0.5")
_STREAK = ("--config.loss.position_weights=streak",)
_I = ("--config.loss.intersection_vocab=True",)
_ORIGINAL = ("--config.loss.mask_mode=original",)
BASELINE = "original+kl"
RECIPES = {
    "original+kl": _ORIGINAL + ("--config.loss.kind=kl",),
    "original+alpha": _ORIGINAL + ("--config.loss.kind=alpha",),
    "original+lk": _ORIGINAL + ("--config.loss.kind=lk",),
    "original+kl+intersection": _ORIGINAL + ("--config.loss.kind=kl",) + _I,
    "draft_blocks+kl": _DB + ("--config.loss.kind=kl",),
    "draft_blocks+lk": _DB + ("--config.loss.kind=lk",),
    "draft_blocks+kl+streak": _DB + _STREAK + ("--config.loss.kind=kl",),
    "draft_blocks+lk+streak": _DB + _STREAK + ("--config.loss.kind=lk",),
    "draft_blocks+alpha+streak": _DB + _STREAK + ("--config.loss.kind=alpha",),
    "draft_blocks+lk+streak+intersection": _DB + _STREAK + ("--config.loss.kind=lk",) + _I,
    "draft_blocks_dense+kl": _DENSE + ("--config.loss.kind=kl",),
    "draft_blocks_dense+kl+streak": _DENSE + _STREAK + ("--config.loss.kind=kl",),
    "draft_blocks_dense+kl+streak+intersection": _DENSE + _STREAK + ("--config.loss.kind=kl",) + _I,
    "draft_blocks_dense+kl+streak+gamma4-8": _DENSE + _STREAK + (
        "--config.loss.kind=kl", "--config.loss.draft_gamma_max=8"),
    "draft_blocks_dense+lk+streak": _DENSE + _STREAK + ("--config.loss.kind=lk",),
    "draft_blocks_mixed+kl": _MIXED + ("--config.loss.kind=kl",),
    "draft_blocks_mixed+lk+streak": _MIXED + _STREAK + ("--config.loss.kind=lk",),
    # The same updates, the last half as 2 on-policy rounds (llada_jax/onpolicy):
    # --steps S = S/2 offline + 2 x S/4 on the offline data mixed 1:1 with the rounds' records
    # (128 training prompts a round, decoded as the measurement decodes, sampled at T = 1; the
    # demo names its teacher, onpolicy.teacher).
    "original+kl+onpolicy": _ORIGINAL + ("--config.loss.kind=kl", "--config.onpolicy.rounds=2",
                                         "--config.onpolicy.max_new_tokens=16"),
}
# Settings a recipe derives from the run's steps: field -> value for S steps.
PER_STEPS = {"onpolicy.steps_per_round": lambda steps: max(steps // 4, 1)}
