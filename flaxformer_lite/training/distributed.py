"""Many processes (hosts): start `jax.distributed`, split the global batch, log from one.

Every process runs the same program. After `initialize`, `jax.devices()` lists the devices of
all processes and a mesh or pmap spans them; each process feeds only its own slice of every
global batch (`process_slice`), and only process 0 prints and writes logs (`is_main_process`).
Checkpoints are written by all processes together (each saves the array shards it holds).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

_initialized = False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               local_device_ids: int | Sequence[int] | None = None,
               auto_detect: bool = False) -> bool:
    """Connect this process to the others; returns True when running multi-process.

    Arguments left as None are read from the environment (`JAX_COORDINATOR_ADDRESS` =
    "host:port" of process 0, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`). With neither, nothing
    happens (one process) unless `auto_detect=True`, which lets JAX discover a cluster (Cloud
    TPU, SLURM, Open MPI, ...). On CPU the cross-process collectives use gloo. Call it before
    any other JAX call; calling it again is a no-op.
    """
    global _initialized
    if _initialized:
        return jax.process_count() > 1
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    explicit = coordinator_address is not None or num_processes is not None
    if not explicit and not auto_detect:
        return False
    if explicit and num_processes == 1:  # a launcher's single process: nothing to join
        _initialized = True
        return False
    if explicit and (coordinator_address is None or num_processes is None or process_id is None):
        raise ValueError(
            "Multi-process training needs all of coordinator_address, num_processes and "
            f"process_id (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); got "
            f"{coordinator_address!r}, {num_processes!r}, {process_id!r}.")
    # gloo gives CPU devices cross-process collectives; harmless on GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id,
                                   local_device_ids=local_device_ids)
    except ValueError as error:
        if explicit:
            raise
        raise ValueError(f"initialize(auto_detect=True) found no cluster to join (JAX: {error}); "
                         f"on one machine leave auto_detect off, or set {ENV_COORDINATOR}, "
                         f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}.") from error
    _initialized = True
    if is_main_process():
        log.info("jax.distributed: %d processes, %d devices (%d local).", jax.process_count(),
                 jax.device_count(), jax.local_device_count())
    return jax.process_count() > 1


def is_main_process() -> bool:
    """True on the process that logs and writes summaries (process 0)."""
    return jax.process_index() == 0


def process_slice(global_batch_size: int, process_index: int | None = None,
                  process_count: int | None = None) -> slice:
    """Rows of the global batch that this process feeds: the `process_index`-th of
    `process_count` equal, contiguous blocks."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if global_batch_size % count:
        raise ValueError(f"Global batch size {global_batch_size} is not divisible by the "
                         f"{count} processes; choose a multiple of {count}.")
    per_process = global_batch_size // count
    return slice(index * per_process, (index + 1) * per_process)


def local_batch(global_batch: Mapping[str, np.ndarray], process_index: int | None = None,
                process_count: int | None = None) -> dict[str, np.ndarray]:
    """This process's slice (`process_slice`) of every array of a global batch."""
    sizes = {np.shape(v)[0] for v in global_batch.values()}
    if len(sizes) != 1:
        raise ValueError(f"Batch arrays disagree on the batch size: {sorted(sizes)}.")
    rows = process_slice(sizes.pop(), process_index, process_count)
    return {k: np.asarray(v)[rows] for k, v in global_batch.items()}
