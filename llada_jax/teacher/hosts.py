"""Teacher generation over several processes (a TPU slice; localhost processes in tests).

Two ways to run `generate-teacher` with jax.process_count() = P > 1:

- without --mesh, each process decodes its prompt share (prompts p, p + P, ...) with its own
  copy of the teacher on its local devices;
- with --mesh, the teacher is sharded over the GLOBAL mesh (every process's devices: a 70B
  teacher fits no single host) and all processes run one SPMD decode program together. Each
  round, process p brings up to batch_size rows of its share; `layout_batch` gathers them into
  one global batch of P * batch_size rows (process p's rows at p * batch_size ...), padded to a
  prompt-length bucket every process agrees on, so every process compiles the same shapes.
  The decode step's picks come back replicated, so every process sees every row's chosen token
  (the stop test is the same everywhere) and reads its own rows' logits from its devices.

Either way, `own_rounds` gives every process the same number of rounds (so the collectives
that follow each round line up) and `gather` brings every process's results to all of them,
for process 0 to write the dataset or JSON file once, in prompt order.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from llada_jax.errors import GenerateError


def spans_processes(mesh: jax.sharding.Mesh | None) -> bool:
    """True when `mesh` holds devices of more than one process (decoding is then collective)."""
    return mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1


@dataclasses.dataclass(frozen=True)
class Layout:
    """One batch as the decode step sees it (the same arrays on every process)."""
    tokens: np.ndarray  # int32 [G, W], row b's prompt at columns pads[b]..W-1
    pads: np.ndarray    # int32 [G]
    real: np.ndarray    # bool [G]: holds a prompt (other rows repeat the first one: one shape)
    own: slice          # the rows of this process's prompts, in its order


def layout_batch(ids_per_prompt: Sequence[Sequence[int]], batch_size: int, pad_id: int,
                 bucket: int, collective: bool) -> Layout | None:
    """This process's <= batch_size prompts as rows of a left-padded batch; `collective`: the
    global batch of all processes' rows (every process must call it). None when no row has a
    prompt (in a collective call: no process has one left)."""
    rank = jax.process_index() if collective else 0
    lengths = np.full(batch_size, -1, np.int32)  # -1: no prompt in this row
    lengths[:len(ids_per_prompt)] = [len(ids) for ids in ids_per_prompt]
    if collective:
        lengths = _allgather(lengths).reshape(-1)
    real = lengths >= 0
    if not real.any():
        return None
    width = -(-int(lengths.max()) // bucket) * bucket
    tokens = np.full((batch_size, width), pad_id, np.int32)
    for r, ids in enumerate(ids_per_prompt):
        tokens[r, width - len(ids):] = ids
    if collective:
        tokens = _allgather(tokens).reshape(-1, width)
    first = int(np.argmax(real))
    tokens[~real], lengths[~real] = tokens[first], lengths[first]
    start = rank * batch_size
    return Layout(tokens, width - lengths, real, slice(start, start + len(ids_per_prompt)))


def raise_together(error: Exception | None) -> None:
    """Collective: raises `error` where it happened and a GenerateError naming that process on
    every other process, so that no process is left waiting for the others."""
    failed = _allgather(np.array([error is not None])).reshape(-1)
    if error is not None:
        raise error
    if failed.any():
        raise GenerateError(f"process {int(np.argmax(failed))} stopped on a bad prompt (its "
                            f"message says which); this process stops with it")


def own_rows(x: jax.Array, own: slice) -> np.ndarray:
    """Rows `own` of a replicated (or single-device) array, read from this process's devices."""
    return np.asarray(x.addressable_data(0)[own])


def num_rounds(num_prompts: int, batch_size: int) -> int:
    """Batches of the process with the largest share (process 0's)."""
    return math.ceil(math.ceil(num_prompts / jax.process_count()) / batch_size)


def own_rounds(batches: Iterator[list], num_prompts: int, batch_size: int
               ) -> Iterator[list[tuple[int, str, object]]]:
    """(prompt index, text, row) of this process's batch in each of num_rounds rounds, the
    same count on every process (an empty list once its share is done). `batches` yields the
    (text, row) lists of its share, prompts p, p + P, ... (generate.generate_batches)."""
    count, rank = jax.process_count(), jax.process_index()
    for round_no in range(num_rounds(num_prompts, batch_size) if num_prompts else 0):
        batch = next(batches, [])
        yield [(rank + count * (round_no * batch_size + j), text, row)
               for j, (text, row) in enumerate(batch)]


def gather(local: list) -> list:
    """Every process's `local` items, on every process, process 0's first (pickled bytes over
    JAX's collectives); `local` itself in a single process."""
    if jax.process_count() == 1:
        return list(local)
    payload = np.frombuffer(pickle.dumps(local), np.uint8)
    sizes = _allgather(np.array([payload.size], np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:payload.size] = payload
    gathered = _allgather(padded)
    return [item for p, size in enumerate(sizes)
            for item in pickle.loads(gathered[p, :size].tobytes())]


def describe_share(model) -> str:
    return (f"generate-teacher: process {jax.process_index()} of {jax.process_count()} holds "
            f"{param_share(model):.1%} of the teacher's parameter bytes")


def _allgather(x: np.ndarray) -> np.ndarray:
    """[P, *x.shape]: every process's x (a writable copy), on every process."""
    return np.array(multihost_utils.process_allgather(x))


def param_share(model) -> float:
    """The fraction of the params' bytes this process holds (each distinct shard once): 1.0
    for a replicated teacher, about 1/P when the mesh splits every matrix across processes."""
    held = total = 0
    for x in jax.tree.leaves(nnx.state(model, nnx.Param)):
        total += x.nbytes
        seen = set()
        for shard in x.addressable_shards:
            key = tuple((s.start, s.stop) for s in shard.index)
            if key not in seen:
                seen.add(key)
                held += shard.data.nbytes
    return held / max(total, 1)
