"""On-policy rounds in one workdir: offline training, then N x (collect with the latest drafter,
train K steps on the offline data mixed with every round so far). Settings: config.onpolicy.

    WORKDIR/train/                  the one train workdir (checkpoints, metrics): one optimizer
                                    and one learning-rate schedule over train.num_steps
    WORKDIR/rounds/round_000/       round 0's records (collect.py), complete or absent
    WORKDIR/rounds/round_000.partial/  a round being written (removed and redone on resume)

Steps: offline = train.num_steps - rounds x steps_per_round; round r collects with the params of
step offline + r x K and trains to offline + (r + 1) x K. A run resumes wherever it was killed:
training from its latest checkpoint (params, optimizer, data iterator: bit-exact), collection
from the start of the round, because a round's records are written under `.partial` and renamed
when complete, so a half-written round is never read. Collection is deterministic (seeded per
round and prompt), so a redone round equals the one that was cut short.

The data iterator carries over from one stretch to the next (its position in the new mixture),
so every stretch, and every resume inside it, reads a fixed sequence of batches.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import ml_collections
from flax import nnx

from data_pipeline import loader
from llada_jax.errors import ConfigError
from llada_jax.speculate import loop as sp
from llada_jax.onpolicy import collect
from llada_jax.teacher.prompts import read_prompts
from llada_jax.train.trainer import Trainer


@dataclasses.dataclass(frozen=True)
class Plan:
    offline_steps: int
    steps_per_round: int
    rounds: int

    def end_of(self, stretch: int) -> int:
        """The step stretch s ends at: s = 0 offline, s = r + 1 after round r's data."""
        return self.offline_steps + stretch * self.steps_per_round


def plan(config: ml_collections.ConfigDict) -> Plan:
    """The step plan; ConfigError when the on-policy settings cannot run."""
    op, total = config.onpolicy, config.train.num_steps
    problems = []
    if op.rounds < 1:
        problems.append("onpolicy.rounds must be >= 1 (--rounds N)")
    if total < op.rounds * op.steps_per_round:
        problems.append(f"train.num_steps={total} must be at least onpolicy.rounds x "
                        f"onpolicy.steps_per_round = {op.rounds * op.steps_per_round} (the "
                        f"offline steps are the rest)")
    if not op.teacher:
        problems.append("onpolicy.teacher is empty: pass --teacher (a causal teacher params "
                        "checkpoint or HF dir)")
    if config.data.mix:
        problems.append("data.mix is set by the rounds themselves (data.dir + each round): "
                        "leave it empty")
    if problems:
        raise ConfigError("invalid on-policy config:\n  " + "\n  ".join(problems))
    return Plan(total - op.rounds * op.steps_per_round, op.steps_per_round, op.rounds)


def round_dir(workdir: pathlib.Path, r: int) -> pathlib.Path:
    return workdir / "rounds" / f"round_{r:03d}"


def mixed(config: ml_collections.ConfigDict, rounds: list[pathlib.Path]
          ) -> ml_collections.ConfigDict:
    """The config of a stretch: data.dir mixed with `rounds` (their share split evenly)."""
    config = ml_collections.ConfigDict(config.to_dict())
    if rounds:
        share = config.onpolicy.weight / len(rounds)
        config.data.mix = ((config.data.dir, 1.0 - config.onpolicy.weight),
                           *((str(r), share) for r in rounds))
    return config


def run_rounds(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
               progress: bool = False, log: Callable[[str], None] = lambda _: None) -> Trainer:
    """Runs (or resumes) every stretch; returns the last stretch's Trainer (final_state)."""
    workdir = pathlib.Path(workdir)
    steps = plan(config)
    trainer = _train(config, workdir, steps.end_of(0), progress)
    log(f"offline: step {steps.end_of(0)}")
    prompts = _prompts(config)
    done: list[pathlib.Path] = []
    for r in range(steps.rounds):
        data = round_dir(workdir, r)
        if not data.is_dir():
            _check_drafter_step(trainer, steps.end_of(r), r, workdir)
            report = _collect(config, trainer, prompts, r, data)
            log(f"round {r}: collected {report['written']} blocks -> {data}")
        done.append(data)
        trainer = _train(mixed(config, done), workdir, steps.end_of(r + 1), progress)
        log(f"round {r}: step {steps.end_of(r + 1)}")
    return trainer


def _train(config, workdir: pathlib.Path, stop_at: int, progress: bool) -> Trainer:
    trainer = Trainer(config, workdir / "train", progress=progress)
    trainer.fit(stop_at=stop_at)
    return trainer


def _check_drafter_step(trainer: Trainer, want: int, r: int, workdir: pathlib.Path) -> None:
    """Round r collects with the drafter of step `want`; a workdir trained further without
    round r's records was made with other settings."""
    have = int(trainer.final_state.step)
    if have != want:
        raise ConfigError(f"{workdir / 'train'} holds step {have} but round {r} collects with "
                          f"the drafter of step {want}: the workdir was made with other "
                          f"onpolicy / train.num_steps settings; use them, or a new --workdir")


def _prompts(config: ml_collections.ConfigDict) -> list[str]:
    op = config.onpolicy
    if op.prompts:
        prompts = list(read_prompts([op.prompts]))
    else:
        prompts = loader.prompt_texts(config.data.dir, "train", _data_options(config)[0])
    if not prompts:
        raise ConfigError(f"no prompts to collect on in {op.prompts or config.data.dir}")
    return prompts


def _data_options(config) -> tuple[str, str, int]:
    """(student tokenizer, teacher tokenizer, top_k) of data.dir, the records' own."""
    meta = loader.read_metadata(config.data.dir)
    teacher_tokenizer = config.onpolicy.teacher_tokenizer or meta.options["teacher_tokenizer"]
    return meta.options["student_tokenizer"], teacher_tokenizer, meta.top_k


def _collect(config, trainer: Trainer, prompts: list[str], r: int, out: pathlib.Path) -> dict:
    """Round r's records, decoded by the trainer's final params (written atomically)."""
    op = config.onpolicy
    n = op.prompts_per_round
    chosen = [prompts[(r * n + i) % len(prompts)] for i in range(n)]
    decoding = sp.Decoding(op.max_new_tokens, greedy=op.greedy, temperature=op.temperature)
    student_tokenizer, teacher_tokenizer, top_k = _data_options(config)
    session = sp.setup(None, op.teacher, chosen, gamma=op.gamma, steps=op.denoising_steps,
                       trailing_masks=op.trailing_masks, decoding=decoding,
                       drafter_tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer,
                       drafter_model=nnx.merge(trainer.graphdef, trainer.final_state.params))
    opts = collect.collector_options(session, student_tokenizer, teacher_tokenizer, top_k,
                                     config.data.seq_len)
    return collect.write_records_atomically(collect.HostLoopCollector(session, decoding), chosen,
                                            str(out), opts, seed=(op.seed, r))
