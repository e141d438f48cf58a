"""Process start-up shared by every multi-process command: joining the other processes."""

from __future__ import annotations

import os

import jax


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
    """Multi-host: TPU pods discover their peers; elsewhere the coordinator is given explicitly
    (the `--coordinator-address/--num-processes/--process-id` flags). Single host: nothing."""
    if coordinator_address:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif on_multihost_tpu():
        jax.distributed.initialize()


def on_multihost_tpu() -> bool:
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
