"""Training for acceptance (issue 16): alpha / lk gradients against float64 NumPy finite
differences, weighted and vocabulary-restricted loss through both head cuts against a float64
dense reference, position weights, and the draft_blocks layout against a per-segment loop."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax.distill import loss, masking
from tests.helpers import (MASK, SEGMENTS, jax_divergence, np_buckets, np_divergence,
                           packed_batch, topk_case)


def np_loss(student, ids, lp, kind, temperature, lk_weight=None):
    p, q = np_buckets(student, ids, lp, temperature)
    return np_divergence(p, q, kind, lk_decay=1.5, lk_weight=lk_weight)


@pytest.mark.parametrize("kind", ["alpha", "lk"])
@pytest.mark.parametrize("temperature", [1.0, 1.4])
def test_alpha_and_lk_gradients_match_float64_finite_differences(kind, temperature):
    student, ids, lp = topk_case(np.random.default_rng(11))
    student = student.astype(np.float64)
    p, q = np_buckets(student, ids, lp, temperature)
    w = np.exp(-1.5 * np.minimum(p, q).sum(-1))  # lk's KL weight, held fixed (no gradient)
    got = jax.grad(lambda x: jax_divergence(x, ids, lp, kind, temperature, 0.5, 1.5).sum())(
        jnp.asarray(student, jnp.float32))
    want, h = np.zeros_like(student), 1e-6
    for idx in np.ndindex(student.shape):
        up, down = student.copy(), student.copy()
        up[idx] += h
        down[idx] -= h
        want[idx] = (np_loss(up, ids, lp, kind, temperature, w).sum()
                     - np_loss(down, ids, lp, kind, temperature, w).sum()) / (2 * h)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
    assert np.abs(want).max() > 1e-2  # the reference is not trivially zero


def dense_reference(hidden, head, ids, lp, mask, weights, bias, kind, temperature):
    """float64 sum of weight * divergence, student restricted by the bias."""
    logits = np.einsum("bld,dv->blv", np.asarray(hidden, np.float64),
                       np.asarray(head, np.float64)) + bias
    b, l, v = logits.shape
    d = np_loss(logits.reshape(-1, v), ids.reshape(b * l, -1), lp.reshape(b * l, -1), kind,
                temperature)
    return float(np.sum(np.where(mask.reshape(-1), weights.reshape(-1) * d, 0.0)))


@pytest.mark.parametrize("kind", ["kl", "alpha", "lk"])
@pytest.mark.parametrize("cut", [dict(chunk_axis="sequence", chunk_size=4),
                                 dict(chunk_axis="vocab", vocab_tile=7)])
def test_weighted_restricted_loss_through_the_head(kind, cut):
    rng = np.random.default_rng(12)
    b, seq, d, v, k = 2, 10, 8, 48, 5
    hidden = jnp.asarray(rng.normal(size=(b, seq, d)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), jnp.float32)
    allowed = np.ones(v, bool)
    allowed[rng.permutation(v)[:12]] = False  # the student may not use 12 ids
    inside = np.flatnonzero(allowed)
    ids = np.stack([rng.permutation(inside)[:k] for _ in range(b * seq)]).reshape(b, seq, k)
    lp = np.sort(np.log(rng.dirichlet(np.ones(v), size=(b, seq))[..., :k]), -1)[..., ::-1]
    lp = np.ascontiguousarray(lp).astype(np.float32)
    mask = rng.random((b, seq)) < 0.7
    weights = rng.uniform(0.2, 2.0, size=(b, seq)).astype(np.float32)
    bias = np.where(allowed, 0.0, -np.inf)
    args = (hidden, head, jnp.asarray(ids, jnp.int32), jnp.asarray(lp), jnp.asarray(mask))

    def total(h, w):
        return loss.distill_loss(h, w, *args[2:], kind=kind, temperature=1.3, lk_decay=1.5,
                                 weights_bl=jnp.asarray(weights),
                                 vocab_bias_v=jnp.asarray(bias, jnp.float32), **cut)[0]

    value, grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(hidden, head)
    want = dense_reference(hidden, head, ids, lp, mask, weights, bias, kind, 1.3)
    np.testing.assert_allclose(value, want, rtol=2e-5)
    dense = jax.grad(lambda h, w: loss.dense_distill_loss(
        h, w, *args[2:], kind=kind, temperature=1.3, lk_decay=1.5,
        weights_bl=jnp.asarray(weights), vocab_bias_v=jnp.asarray(bias, jnp.float32))[0],
        argnums=(0, 1))(hidden, head)
    for a, r in zip(grads, dense):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=2e-6 * float(jnp.max(jnp.abs(r))))
    # Restricted: the head columns the student may not use get no gradient.
    assert np.all(np.asarray(grads[1])[:, ~allowed] == 0.0)


def test_acceptance_sums_by_offset_are_the_reference_alpha():
    rng = np.random.default_rng(13)
    hidden = jnp.asarray(rng.normal(size=(1, 6, 4)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(4, 20)), jnp.float32)
    ids = np.stack([rng.permutation(20)[:3] for _ in range(6)])[None].astype(np.int32)
    lp = np.log(rng.dirichlet(np.ones(20), size=(1, 6))[..., :3]).astype(np.float32)
    offsets = np.array([[-1, 0, 1, 2, 0, 1]], np.int32)
    mask = offsets >= 0
    for cut in (dict(chunk_axis="sequence", chunk_size=2), dict(chunk_axis="vocab")):
        _, _, alpha_g = loss.distill_loss(hidden, head, ids, lp, jnp.asarray(mask),
                                          offsets_bl=jnp.asarray(offsets), n_offsets=3, **cut)
        p, q = np_buckets(np.asarray(hidden[0] @ head), ids[0], lp[0], 1.0)
        alpha = np.minimum(p, q).sum(-1)
        want = [alpha[[1, 4]].sum(), alpha[[2, 5]].sum(), alpha[3]]
        np.testing.assert_allclose(alpha_g, want, rtol=1e-5)


def test_streak_and_geometric_weights():
    a = np.array([0.9, 0.6, 0.5, 0.2])
    prefix = np.cumprod(a)
    streak = np.array([prefix[j:].sum() for j in range(4)])
    np.testing.assert_allclose(loss.offset_weights("streak", jnp.asarray(a), 0.0, 4),
                               streak / streak.mean(), rtol=1e-6)
    np.testing.assert_allclose(loss.offset_weights("streak", -jnp.ones(4), 0.0, 4), np.ones(4))
    geo = 0.5 ** np.arange(4)
    np.testing.assert_allclose(loss.offset_weights("geometric", None, 0.5, 4), geo / geo.mean(),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="loss.position_weights"):
        loss.offset_weights("nope", None, 0.5, 4)


@pytest.mark.parametrize("gamma, gamma_max, trailing", [(3, 0, 2), (2, 4, 1)])
def test_draft_blocks_layout_per_segment(gamma, gamma_max, trailing):
    """Per segment: prompt + a prefix visible, a block of gamma scored masks (offsets 0..g-1),
    `trailing` unscored masks, the rest hidden (segment 0); a loop over the segments checks it."""
    batch = packed_batch(np.random.default_rng(14), rows=6, seq=40, segments=SEGMENTS)
    out = jax.jit(lambda k, b: masking.draft_blocks(k, b, mask_token_id=MASK, gamma=gamma,
                                                    gamma_max=gamma_max, trailing=trailing))(
        jax.random.key(3), batch)
    noisy, scored, offset, segs = (np.asarray(x) for x in out)
    gammas, cuts = set(), set()
    for row in range(6):
        for sid in range(1, len(SEGMENTS) + 1):
            where = np.flatnonzero(batch["segment_ids"][row] == sid)
            resp = where[~batch["prompt_mask"][row, where]]
            masked = resp[noisy[row, resp] == MASK]
            assert np.all(noisy[row, where[batch["prompt_mask"][row, where]]]
                          == batch["tokens"][row, where[batch["prompt_mask"][row, where]]])
            c = int(np.searchsorted(resp, masked[0])) if len(masked) else len(resp)
            assert c < len(resp)  # every segment drafts a block
            cuts.add(c)
            np.testing.assert_array_equal(masked, resp[c:c + len(masked)])  # one contiguous run
            visible = resp[c + len(masked):]
            assert np.all(segs[row, visible] == 0)  # the future is hidden
            assert np.all(segs[row, np.setdiff1d(where, visible)] == sid)
            block = masked[:len(masked) - trailing] if len(resp) - c > len(masked) else masked
            g = len(block) if len(resp) - c > len(masked) else None
            if g is not None:
                gammas.add(g)
                assert (gamma <= g <= max(gamma, gamma_max))
            for j, pos in enumerate(masked):
                has_target = batch["target_mask"][row, pos]
                in_block = g is None and j < max(gamma, gamma_max) or g is not None and j < g
                if not in_block:
                    assert not scored[row, pos] and offset[row, pos] == -1
                elif g is not None:
                    assert scored[row, pos] == has_target
                    assert offset[row, pos] == (j if has_target else -1)
    assert len(cuts) > 3
    if gamma_max:
        assert len(gammas) >= 2  # gamma is drawn per segment


def test_draft_blocks_denser_signal_options():
    """score_prefix / score_trailing add the visible prefix / the trailing masks to the scored
    positions (offsets stay the block's); original_fraction leaves whole segments, drawn per
    segment, to the original masking (nothing hidden, every response target scored)."""
    batch = packed_batch(np.random.default_rng(15), rows=40, seq=40, segments=SEGMENTS)
    gamma, trailing = 2, 2
    base = masking.draft_blocks(jax.random.key(4), batch, mask_token_id=MASK, gamma=gamma,
                                trailing=trailing)
    dense = masking.draft_blocks(jax.random.key(4), batch, mask_token_id=MASK, gamma=gamma,
                                 trailing=trailing, score_prefix=True, score_trailing=True)
    response = np.asarray(masking.response_mask(batch))
    target = np.asarray(batch["target_mask"])
    masked = np.asarray(base.noisy) == MASK
    for a, b in zip(base, dense):  # same layout and offsets, only the loss mask grows
        if a is not base.loss_mask:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    visible = response & ~masked & (np.asarray(base.segment_ids) > 0)
    np.testing.assert_array_equal(np.asarray(dense.loss_mask), (masked | visible) & target)
    assert np.asarray(dense.loss_mask).sum() > 2 * np.asarray(base.loss_mask).sum()

    mixed = masking.draft_blocks(jax.random.key(5), batch, mask_token_id=MASK, gamma=gamma,
                                 trailing=trailing, original_fraction=0.5)
    kinds = []
    for row in range(40):
        for sid in range(1, len(SEGMENTS) + 1):
            resp = np.flatnonzero((batch["segment_ids"][row] == sid) & response[row])
            seg_masked = np.asarray(mixed.noisy)[row, resp] == MASK
            original = bool(np.all(np.asarray(mixed.loss_mask)[row, resp] == target[row, resp]))
            drafted = (seg_masked.sum() <= gamma + trailing
                       and np.asarray(mixed.loss_mask)[row, resp].sum() <= gamma)
            assert original or drafted
            if original and not drafted:
                assert np.all(np.asarray(mixed.segment_ids)[row, resp] == sid)
                assert np.all(np.asarray(mixed.offset)[row, resp] == -1)
                kinds.append(1)
            elif drafted and not original:
                kinds.append(0)
    assert 0.3 < np.mean(kinds) < 0.7 and len(kinds) > 60  # about half of each kind


STREAK_STEP = {"loss.mask_mode": "draft_blocks", "loss.position_weights": "streak",
               "loss.intersection_vocab": True, "loss.draft_gamma": 3, "loss.draft_trailing": 2,
               "loss.draft_score_prefix": True, "loss.streak_ema": 0.5, "loss.chunk_size": 16,
               "optim.lr": 1e-2, "optim.warmup_steps": 0}


def numpy_step_reference(jitted, params, batch, rng, step, loss_cfg, bias, acceptance):
    """float64 NumPy: (sum of streak-weighted KL over the scored positions, mean alpha per
    offset) of one step of `jit_train_step` on `batch`; the layout from `training_mask` (tested
    above), the hidden states from the model, the rest written from the definitions."""
    from flax import nnx

    from llada_jax.train import train_step

    noisy, mask, offsets, segs = (np.asarray(x) for x in train_step.training_mask(
        jax.random.fold_in(rng, step), batch, loss_cfg, jitted.model_cfg.mask_token_id))
    model = nnx.merge(jitted.graphdef, params)
    hidden = np.asarray(model(jnp.asarray(noisy), positions_bl=batch["positions"],
                              segment_ids_bl=jnp.asarray(segs), return_hidden=True), np.float64)
    logits = hidden @ np.asarray(model.lm_head_weight(), np.float64) + bias
    v, k = logits.shape[-1], batch["teacher_ids"].shape[-1]
    p, q = np_buckets(logits.reshape(-1, v), batch["teacher_ids"].reshape(-1, k),
                      batch["teacher_logprobs"].reshape(-1, k), 1.0)
    kl = np_divergence(p, q, "kl").reshape(mask.shape)
    alpha = np.minimum(p, q).sum(-1).reshape(mask.shape)
    g = int(loss_cfg.draft_gamma)
    if np.all(acceptance < 0):
        w_g = np.ones(g)
    else:
        prefix = np.cumprod(np.clip(acceptance, loss.STREAK_ALPHA_FLOOR, 1.0))
        w_g = np.array([prefix[j:].sum() for j in range(g)])
        w_g = w_g / w_g.mean()
    weights = np.where(offsets >= 0, w_g[np.maximum(offsets, 0)], 1.0)
    mean_alpha = np.array([alpha[(offsets == j) & mask].mean() for j in range(g)])
    return float(np.sum(np.where(mask, weights * kl, 0.0))), mean_alpha


def test_streak_intersection_train_step_matches_numpy(tmp_path):
    """Two steps of the jitted train step (draft_blocks + streak weights + the TLI intersection
    bias the trainer builds from the tokenizers): each step's loss sum and the state's smoothed
    acceptance against a float64 NumPy reference; step 2's weights are not uniform."""
    from data_pipeline import batch as batch_lib
    from llada_jax import sharding
    from llada_jax.model.config import ModelConfig
    from llada_jax.train import config as train_config
    from llada_jax.train import train_step
    from tests.helpers import ROOT, make_tokenizers

    model_cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64,
                            vocab_size=96, mask_token_id=95, dtype="float32")
    teacher_dir, student_dir = make_tokenizers(str(tmp_path))
    bias = np.asarray(loss.intersection_bias(student_dir, teacher_dir, 96, 95), np.float64)
    allowed = np.flatnonzero(np.isfinite(bias))
    assert 20 < len(allowed) < 95  # a real restriction
    config = train_config.load_config(str(ROOT / "configs" / "tiny.py"),
                                      [f"--config.{k}={v}" for k, v in STREAK_STEP.items()])
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    jitted = train_step.jit_train_step(config, model_cfg, mesh, sharding.DEFAULT_RULES,
                                       total_steps=10, vocab_bias=jnp.asarray(bias, jnp.float32))
    state, rng = jitted.random_state(0), jax.random.key(9)
    acceptance = np.full(3, -1.0)
    with jax.set_mesh(mesh), sharding.rules_context(sharding.DEFAULT_RULES):
        for step in range(2):
            batch = batch_lib.synthetic(np.random.default_rng(step), (6, 32, 5),
                                        vocab_size=len(allowed), segments=[(3, 11), (4, 12)])
            for name in ("tokens", "teacher_ids"):  # every id inside the intersection
                batch[name] = allowed[batch[name]].astype(np.int32)
            params = jax.tree.map(np.array, state.params)  # the step donates its state
            want_sum, mean_alpha = numpy_step_reference(jitted, params, batch, rng, step,
                                                        config.loss, bias, acceptance)
            state, metrics = jitted.step(state, batch, rng)
            np.testing.assert_allclose(float(metrics["loss_sum"]), want_sum, rtol=2e-5)
            acceptance = (mean_alpha if step == 0 else 0.5 * acceptance + 0.5 * mean_alpha)
            np.testing.assert_allclose(np.asarray(state.acceptance), acceptance, rtol=1e-5)
    assert np.ptp(acceptance) > 1e-3  # so step 2's streak weights differed from uniform


def test_streak_acceptance_resumes_bit_exact(tmp_path, capsys):
    """The smoothed acceptance lives in the checkpointed train state: a run resumed from its
    step-4 checkpoint (the step-8 one removed) ends bit for bit where the straight run does,
    params and acceptance (steps 5-8 are weighted by the restored acceptance)."""
    import shutil

    from llada_jax.train import config as train_config
    from llada_jax.train.trainer import Trainer
    from tests.helpers import ROOT, make_dataset

    data_dir = make_dataset(str(tmp_path / "data"), n=48)
    config = train_config.load_config(str(ROOT / "configs" / "tiny.py"), [
        f"--config.data.dir={data_dir}", "--config.data.seq_len=64",
        "--config.data.global_batch_size=8", "--config.train.num_steps=8",
        "--config.train.num_epochs=1000", "--config.train.checkpoint_every=4",
        "--config.train.eval_every=0", "--config.train.async_checkpointing=False",
        "--config.loss.mask_mode=draft_blocks", "--config.loss.position_weights=streak",
        "--config.loss.draft_score_prefix=True", "--config.optim.lr=1e-2"])

    def run(workdir):
        trainer = Trainer(config, workdir, progress=False)
        trainer.fit()
        return jax.tree.map(np.asarray, (trainer.final_state.params, trainer.final_state.acceptance))

    straight = run(tmp_path / "straight")
    run(tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "8")
    capsys.readouterr()
    resumed = run(tmp_path / "resumed")
    assert "resumed from step 4" in capsys.readouterr().out
    leaves_a, leaves_b = jax.tree.leaves(straight), jax.tree.leaves(resumed)
    assert len(leaves_a) == len(leaves_b) > 2
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(a, b)
    acceptance = straight[1]
    assert acceptance.shape == (4,) and np.all(acceptance > 0) and np.ptp(acceptance) > 1e-3


def test_every_compare_recipe_is_a_valid_train_config(tmp_path):
    """`demo --compare-strategies` rows: each loads as a config the train step accepts, and
    sets what its name says."""
    from llada_jax.commands import demo
    from llada_jax.train import config as train_config
    from llada_jax.distill.loss import LossConfig

    for name, overrides in demo.RECIPES.items():
        config = train_config.apply_overrides(  # (no dataset: validate() would look for it)
            train_config.load_config_file("tiny"),
            demo.demo_overrides(tmp_path, 10, None) + list(overrides))
        LossConfig.from_config(config.loss)
        mode, kind = name.split("+")[:2]
        assert config.loss.mask_mode == mode.replace("_dense", "").replace("_mixed", "")
        assert config.loss.kind == kind
        assert (config.loss.position_weights == "streak") == ("streak" in name)
        assert config.loss.intersection_vocab == ("intersection" in name)
        assert config.loss.draft_score_prefix == ("_dense" in mode or "_mixed" in mode)
        assert config.loss.draft_score_trailing == ("_mixed" in mode)
        assert (config.loss.draft_original_fraction > 0) == ("_mixed" in mode)
        assert config.loss.draft_gamma_max == (8 if name.endswith("+gamma4-8") else 0)


def test_recipe_table_ranks_on_selection_prompts_and_reports_confirmation():
    """The table ranks by the selection prompts' key only; the confirmation columns are the
    mean over seeds and their own ratio to the baseline (numbers worked by hand)."""
    from llada_jax.commands import demo

    def run(g, s, cg, cs):
        return {"measured_greedy": g, "measured_sampled": s, "confirm_greedy": cg,
                "confirm_sampled": cs, "kl": 1.0, "alpha_lower": 0.3, "alpha_upper": 0.5,
                "E_lower": 1.4}

    rows = {demo.BASELINE: [run(1.5, 1.3, 1.4, 1.2), run(1.7, 1.5, 1.6, 1.4)],  # keys 1.5 / 1.4 (confirm)
            "draft_blocks_dense+kl+streak": [run(1.8, 1.4, 1.2, 1.0)]}  # 1.6 (selection), 1.1
    lines = demo.recipe_table(rows).strip().splitlines()
    head = [c.strip() for c in lines[0].split("|")]
    assert head[5:8] == ["CONFIRM greedy", "CONFIRM sampled", f"× {demo.BASELINE}"]
    first, second = ([c.strip() for c in line.split("|")] for line in lines[2:4])
    assert first[0] == "draft_blocks_dense+kl+streak"  # ahead on selection, behind on confirm
    assert first[4] == f"{1.6 / 1.5:.3f}" and first[7] == f"{1.1 / 1.4:.3f}"
    assert second[0] == demo.BASELINE and second[1] == "2"
    assert second[5:8] == ["1.500 ± 0.100", "1.300 ± 0.100", "1.000"]
    del rows[demo.BASELINE][0]["confirm_greedy"]  # an older strategies.json: no columns
    assert "CONFIRM" not in demo.recipe_table(rows)


@pytest.mark.slow
def test_compare_strategies_measures_selection_and_confirmation_prompts(tmp_path, capsys):
    """`demo --compare-strategies` end to end on a small run: every run is measured on the
    first SPEC_PROMPTS held-out prompts and on the ones after them, and the table reports both."""
    from data_pipeline import records
    from llada_jax import cli
    from llada_jax.commands import demo

    out = tmp_path / "cmp"
    assert cli.main(["demo", "--out", str(out), "--compare-strategies", "--max-prompts", "200",
                     "--max-new-tokens", "8", "--steps", "4", "--seeds", "1", "--top", "1",
                     "--rows", "original+kl,draft_blocks_dense+kl+streak"]) == 0
    rows = json.loads((out / "strategies.json").read_text())
    assert sorted(rows) == sorted([demo.BASELINE, "draft_blocks_dense+kl+streak"])
    n_validation = len(records.open_split(str(out / "data"), "validation"))
    assert demo.SPEC_PROMPTS < n_validation < demo.SPEC_PROMPTS + demo.CONFIRM_PROMPTS
    for runs in rows.values():
        for r in runs:
            assert r["speculate_greedy"]["prompts"] == demo.SPEC_PROMPTS
            assert r["confirm_speculate_greedy"]["prompts"] == n_validation - demo.SPEC_PROMPTS
            assert r["confirm_greedy"] == r["confirm_speculate_greedy"]["tokens_per_target_call"]
            assert r["confirm_greedy"] >= 1.0 and r["confirm_sampled"] >= 1.0
    table = capsys.readouterr().out
    assert "CONFIRM greedy" in table and f"{demo.BASELINE} | 1 |" in table
