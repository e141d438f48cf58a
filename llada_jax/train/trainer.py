"""The training loop around `train_step` (see DESIGN.md "Training system"); `llada-jax train`
(commands/train.py) runs it.

    Trainer(config, workdir).fit()

Resumes from the latest checkpoint in `--workdir` without being asked; on SIGTERM or Ctrl-C
(SIGINT), or at the JAX preemption sync point on TPU, saves a checkpoint and exits 0. One run per
workdir: a second one is refused while the first holds WORKDIR/.lock (workdir_lock.py).
"""

from __future__ import annotations

import contextlib
import math
import pathlib
import signal
import sys
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from data_pipeline import loader as data_loader
from llada_jax import checkpoints, drafter_contract
from llada_jax.checkpoints import TrainCheckpointer
from llada_jax import sharding
from llada_jax.distill.metrics import evaluate_model
from llada_jax.train import config as train_config
from llada_jax.distill import loss as loss_lib
from llada_jax.train import optim
from llada_jax.train import run_checks
from llada_jax.train import train_step
from llada_jax.model.config import ModelConfig
from llada_jax.errors import ConfigError
from llada_jax.metrics_writer import MetricsLogger
from llada_jax.tokenizer_checks import student_kind_problem
from llada_jax.workdir_lock import WorkdirLock


def workdir_lock(workdir) -> contextlib.AbstractContextManager:
    """The workdir's lock, taken by process 0 (the one that writes config and metrics)."""
    return WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()


class _Preemption:
    """Turns SIGTERM and the first Ctrl-C (SIGINT) into a flag the step loop checks (save, then
    exit 0); a second Ctrl-C interrupts at once (KeyboardInterrupt: no checkpoint).

    Single process only: with several processes, hosts would see the signal at different steps,
    so there JAX's preemption service (which owns SIGTERM) names one sync step for all hosts,
    and `reached_preemption` is what the loop checks.
    """

    def __init__(self):
        self.requested = None  # the signal's name once one arrived
        self.previous = {}
        if jax.process_count() == 1:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if signum == signal.SIGINT:
            print("\nllada-jax train: Ctrl-C: saving a checkpoint after this step (Ctrl-C again "
                  "to quit without one)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def estimate_total_steps(config: ml_collections.ConfigDict, num_train_tokens: float) -> int:
    """Steps for `num_epochs` passes when rows are packed to `seq_len` (a slight over-estimate:
    packing leaves some room in each row; the loop also stops when the data runs out)."""
    if config.train.num_steps > 0:
        return int(config.train.num_steps)
    rows = math.ceil(num_train_tokens / config.data.seq_len)
    return max(1, math.ceil(rows * config.train.num_epochs / config.data.global_batch_size))


def model_config_for(config: ml_collections.ConfigDict, vocab_size: int, mask_token_id: int,
                     eos_token_id: int | None) -> ModelConfig:
    """The student's ModelConfig: from the init checkpoint, or the config's architecture."""
    m = config.model
    if m.init != "random":
        stored = checkpoints.load_config(m.init)
        if problem := student_kind_problem(f"model.init={m.init}", stored):
            raise ConfigError(problem)
        cfg = checkpoints.load_config(m.init, **train_config.run_settings(config))
        if cfg.vocab_size < vocab_size:
            raise ConfigError(f"model.init={m.init} has vocab_size {cfg.vocab_size} but the data "
                              f"uses student token ids up to {vocab_size - 1}: wrong checkpoint "
                              f"or wrong data dir?")
        return cfg
    return train_config.random_init_model_config(config, vocab_size, mask_token_id, eos_token_id)


class Trainer:
    """Builds the sharded state, the jitted step and the data iterator; `fit()` runs the loop."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                 progress: bool = True):
        train_config.validate(config, num_devices=jax.device_count(),
                              num_processes=jax.process_count(), for_training=True)
        self.config = config
        self.workdir = pathlib.Path(workdir)
        self.progress = progress
        self.mesh = sharding.make_mesh({k: config.mesh[k] for k in sharding.MESH_AXES})
        self.rules = config.mesh.rules
        self.meta = data_loader.read_metadata(config.data.dir)
        self.num_data_shards, self.shards = data_loader.host_shards(
            config.data.global_batch_size, config.data.num_shards)
        mask_id, eos_id = self.meta.mask_and_eos_ids(config.model.mask_token)
        self.model_cfg = model_config_for(config, self.meta.student_vocab_size, mask_id, eos_id)
        run_checks.check_resume_shape(self.workdir, self.model_cfg, config.model.init)
        if config.model.init == "random":
            run_checks.check_fits(self.model_cfg, jax.devices(), what="model.init=random")
        train_tokens = self.meta.num_tokens["train"]
        if train_tokens == 0:
            raise ConfigError(f"{config.data.dir}: split 'train' is empty; nothing to train on")
        self.total_steps = estimate_total_steps(config, train_tokens)
        self.schedule = optim.learning_rate_schedule(config.optim, self.total_steps)
        vocab_bias = None
        if config.loss.intersection_vocab:
            vocab_bias = loss_lib.intersection_bias(
                self.meta.options["student_tokenizer"], self.meta.options["teacher_tokenizer"],
                self.model_cfg.vocab_size, mask_id)
        jitted = train_step.jit_train_step(config, self.model_cfg, self.mesh, self.rules,
                                           self.total_steps, vocab_bias)
        self.jitted = jitted
        self.step_fn, self.graphdef, self.optimizer = jitted.step, jitted.graphdef, jitted.optimizer
        self.abstract_state, self.state_sharding = jitted.abstract_state, jitted.state_sharding
        self.batch_sharding = jitted.batch_sharding
        self.checkpointer = TrainCheckpointer(
            self.workdir, keep=config.train.keep_checkpoints, async_save=config.train.async_checkpointing)

    # -- state ---------------------------------------------------------------------------------
    def initial_state(self) -> train_step.TrainState:
        m = self.config.model
        if m.init == "random":
            return self.jitted.random_state(m.init_seed)
        _, model = checkpoints.load_params(m.init, mesh=self.mesh, rules=self.rules,
                                             dtype=self.model_cfg.param_dtype)
        return jax.jit(lambda p: train_step.init_train_state(p, self.optimizer,
                                                             self.jitted.n_offsets),
                       out_shardings=self.state_sharding)(nnx.state(model, nnx.Param))

    def make_iterator(self, split: str, *, shuffle: bool, num_epochs: int | None):
        """This host's rows of each global batch, from its data shards (see HostShards)."""
        d = self.config.data
        return data_loader.HostShards([data_loader.make_loader(
            d.dir, split, batch_size=d.global_batch_size, seq_len=d.seq_len, seed=d.seed,
            shuffle=shuffle, num_epochs=num_epochs, pack=d.pack, shard_index=i,
            shard_count=self.num_data_shards, mix=tuple(d.mix) if split == "train" else ())
            for i in self.shards])

    def to_global(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
                for k, v in batch.items()}

    def contract(self) -> drafter_contract.Contract:
        """The drafting settings this run trains and measures for: the draft_blocks block
        length (else the smallest eval γ), its trailing masks, one denoising step."""
        loss = self.config.loss
        gamma = loss.draft_gamma if loss.mask_mode == "draft_blocks" else min(self.config.eval.gammas)
        return drafter_contract.for_training(
            gamma=gamma, trailing_masks=loss.draft_trailing, steps=1,
            mask_token_id=self.model_cfg.mask_token_id,
            student_tokenizer=self.meta.options["student_tokenizer"],
            teacher_tokenizer=self.meta.options["teacher_tokenizer"])

    # -- loop ----------------------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> dict | None:
        """Trains to train.num_steps, or only to step `stop_at` (on-policy rounds train a
        stretch at a time on one learning-rate schedule), and checkpoints there; the workdir is
        locked against a second run meanwhile."""
        with workdir_lock(self.workdir):
            return self._fit(stop_at)

    def _fit(self, stop_at: int | None) -> dict | None:
        cfg = self.config
        end = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
        latest = self.checkpointer.latest_step()
        # Metrics logged after the checkpoint being resumed are replayed: drop them.
        logger = MetricsLogger(self.workdir, resume_step=latest or 0)
        if jax.process_index() == 0:  # makes the workdir loadable by eval / export-hf
            checkpoints.write_model_config(self.workdir, self.model_cfg)
            drafter_contract.write(self.workdir, self.contract())
        preemption = _Preemption()
        data_iter = self.make_iterator("train", shuffle=True, num_epochs=cfg.train.num_epochs)
        if latest is not None:
            state = self.checkpointer.restore(
                latest, sharding.with_shardings(self.abstract_state, self.state_sharding), data_iter)
            print(f"llada-jax train: resumed from step {latest} in {self.workdir}")
        else:
            state = self.initial_state()
        start = int(jax.device_get(state.step))
        _say_if_no_eval(self.meta, cfg)
        if start == 0 and cfg.train.eval_every > 0:
            with jax.set_mesh(self.mesh), sharding.rules_context(self.rules):
                self.log_eval(state, 0, logger)  # the "before" of every run
        rng = jax.random.key(cfg.train.seed)
        bar = _progress_bar(self.progress, start, self.total_steps)
        window = _Window()
        last = {}
        pending = None  # (step, metrics) dispatched but not read yet
        step = start
        try:
            with jax.set_mesh(self.mesh), sharding.rules_context(self.rules):
                while step < end:
                    batch = next(data_iter, None)
                    if batch is None:
                        _say_data_ran_out(step, self.total_steps, cfg)
                        break
                    state, metrics = self.step_fn(state, self.to_global(batch), rng)
                    step += 1
                    if pending is not None:  # read step N-1 while step N runs
                        last = window.add(*pending, bar=bar, logger=logger, schedule=self.schedule,
                                          log_every=cfg.train.log_every) or last
                    pending = (step, metrics)
                    if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                        self.log_eval(state, step, logger)
                    # SIGTERM here, or the JAX preemption sync point that every host reaches
                    # at the same step on a TPU pod: save, then leave with exit code 0.
                    stop = preemption.requested or self.checkpointer.reached_preemption(step)
                    if stop or step % cfg.train.checkpoint_every == 0:
                        self.checkpointer.save(step, state, data_iter, cfg.to_dict())
                    if stop:
                        print(f"llada-jax train: preempted ({preemption.requested or 'TPU preemption notice'}) at "
                              f"step {step}; checkpoint saved, exiting")
                        return last
                if pending is not None:
                    last = window.add(*pending, bar=bar, logger=logger, schedule=self.schedule,
                                      log_every=1) or last
                if self.checkpointer.latest_step() != step:
                    self.checkpointer.save(step, state, data_iter, cfg.to_dict())
        finally:
            preemption.restore()
            self.checkpointer_latest = self.checkpointer.latest_step()
            self.checkpointer.close()
            logger.close()
            if bar is not None:
                bar.close()
        self.final_state = state
        return last

    def evaluate(self, state, max_batches: int | None = None) -> dict:
        """Held-out drafter metrics of the state's params (`distill.metrics.evaluate_model`,
        the function `llada-jax eval` runs) on the eval split; {} if it is empty."""
        model = nnx.merge(self.graphdef, state.params)
        batches = self.make_iterator(self.config.data.eval_split, shuffle=False, num_epochs=1)
        return evaluate_model(model, (self.to_global(b) for b in batches),
                                       self.config.eval, max_batches=max_batches)

    def log_eval(self, state, step: int, logger: MetricsLogger) -> None:
        """Periodic held-out metrics under the drafting condition."""
        results = self.evaluate(state, max_batches=self.config.train.eval_batches)
        if results:
            logger.write(step, results["overall"], prefix="eval")


class _Window:
    """Accumulates step metrics as (sum, count) and emits their means every `log_every` steps."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.start_time = time.perf_counter()
        self.steps = 0

    def add(self, step: int, metrics, *, bar, logger, schedule, log_every: int) -> dict | None:
        m = jax.device_get(metrics)
        for key in ("loss_sum", "loss_count", "tokens", "skipped"):
            self.sums[key] = self.sums.get(key, 0.0) + float(m[key])
        self.sums["grad_norm"] = self.sums.get("grad_norm", 0.0) + float(m["grad_norm"])
        self.steps += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(m['loss_sum']) / max(float(m['loss_count']), 1):.4f}")
        if step % log_every:
            return None
        elapsed = time.perf_counter() - self.start_time
        out = {
            "loss": self.sums["loss_sum"] / max(self.sums["loss_count"], 1.0),
            "grad_norm": self.sums["grad_norm"] / self.steps,
            "lr": float(schedule(step - 1)),
            "tokens_per_s": self.sums["tokens"] / elapsed,
            "step_time_s": elapsed / self.steps,
            "skipped_steps": self.sums["skipped"],
        }
        logger.write(step, out)
        self.sums, self.steps, self.start_time = {}, 0, time.perf_counter()
        return out


def _say_data_ran_out(step: int, total_steps: int, config: ml_collections.ConfigDict) -> None:
    """Stopping short of the planned steps changes the run (its schedule was planned for
    `total_steps`): say so, and how to get them all."""
    if jax.process_index() != 0 or not config.train.num_steps:
        return  # num_steps 0: the plan is from the data (a slight over-estimate), as asked
    print(f"llada-jax train: the data ran out at step {step} of the {total_steps} planned "
          f"(train.num_epochs={config.train.num_epochs} passes over the train split); the "
          f"learning-rate schedule was planned for {total_steps} steps. Raise "
          f"--config.train.num_epochs, or set --config.train.num_steps=0 to plan the steps from "
          f"the data", file=sys.stderr)


def _say_if_no_eval(meta: data_loader.DatasetMeta, config: ml_collections.ConfigDict) -> None:
    split = config.data.eval_split
    if config.train.eval_every and not meta.num_examples.get(split) and jax.process_index() == 0:
        print(f"llada-jax train: split {split!r} of {config.data.dir} is empty, so no held-out "
              f"eval runs; rebuild the data with --validation-fraction > 0 (and enough "
              f"examples), or set --config.train.eval_every=0", file=sys.stderr)


def _progress_bar(enabled: bool, start: int, total: int):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
