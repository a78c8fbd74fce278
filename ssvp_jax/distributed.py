"""Multi-process (multi-host) runs: `jax.distributed.initialize`, process 0 as the writer, data shards.

Two processes on one machine (CPU), each with its own share of every training batch:

    python -m ssvp_jax.train --config=configs/tiny.py --workdir=/tmp/run \
        --coordinator_address=127.0.0.1:12355 --num_processes=2 --process_id=0 &
    python -m ssvp_jax.train --config=configs/tiny.py --workdir=/tmp/run \
        --coordinator_address=127.0.0.1:12355 --num_processes=2 --process_id=1

Every process runs the same program (SPMD); `jax.devices()` then lists the devices of all of them
and the mesh of `ssvp_jax.sharding` spans them all.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator, Sequence

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from ssvp_jax.data.pipeline import View, epoch_seed, iterate_batches
from ssvp_jax.data.records import Record

log = logging.getLogger("ssvp_jax")

# Environment variables of cluster launchers that `jax.distributed.initialize()` reads by itself.
_CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts `jax.distributed` when a multi-process run is asked for; returns whether it did.

  Asked for by the arguments (the train CLI's `--coordinator_address`, `--num_processes`,
  `--process_id`), else by the environment: `JAX_COORDINATOR_ADDRESS` with `JAX_NUM_PROCESSES`
  and `JAX_PROCESS_ID`, or a cluster launcher (SLURM, Open MPI, MPICH) with more than one task,
  whose variables JAX reads itself. Nothing asked for: a one-process run, nothing to start.
  Must run before anything touches a device.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  in_cluster = any(int(env.get(k, "1") or 1) > 1 for k in _CLUSTER_ENV)
  if coordinator_address is None and num_processes is None and process_id is None and not in_cluster:
    return False
  if num_processes == 1:
    return False
  if coordinator_address is None and not in_cluster:
    raise ValueError("a multi-process run needs the coordinator's host:port: pass --coordinator_address "
                     "(or set JAX_COORDINATOR_ADDRESS)")
  if not in_cluster and (num_processes is None or process_id is None):
    raise ValueError("--coordinator_address needs --num_processes and --process_id (or JAX_NUM_PROCESSES "
                     "and JAX_PROCESS_ID) outside a cluster launcher")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  log.info("process %d of %d, %d local of %d devices", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
  return True


def is_main() -> bool:
  """True in process 0, the one that writes logs, reports and the progress bar."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process gets here (nothing to wait for in a one-process run)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def process_rows(batch_size: int) -> slice:
  """This process's rows of a global batch: contiguous, process 0 first (the order in which
  `jax.make_array_from_process_local_data` assembles the global array)."""
  count = jax.process_count()
  if batch_size % count:
    raise ValueError(f"the batch of {batch_size} does not split over {count} processes: set "
                     f"--config.optim.batch_size to a multiple of {count}")
  local = batch_size // count
  return slice(jax.process_index() * local, (jax.process_index() + 1) * local)


def any_process(flag: bool) -> bool:
  """Whether `flag` is true in any process. A collective: every process calls it, in the same order."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.asarray(multihost_utils.process_allgather(np.array([int(flag)], np.int32))).any())


def epoch_order(num_records: int, seed: int, epoch: int) -> np.ndarray:
  """The shuffled record order of one training epoch, exactly as `iterate_batches(shuffle=True)` draws it."""
  return np.fromiter(grain.MapDataset.range(num_records).shuffle(seed=epoch_seed(seed, epoch)), np.int64,
                     count=num_records)


def epoch_rows(num_records: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
  """[steps, rows]: positions (in the records) of this process's rows of every global batch of one
  training epoch - the shuffle of `epoch_order`, grouped into batches, the remainder dropped."""
  rows = process_rows(batch_size)
  steps = num_records // batch_size
  return epoch_order(num_records, seed, epoch)[:steps * batch_size].reshape(steps, batch_size)[:, rows]


def train_batches(records: Sequence[Record], views: Sequence[View], *, batch_size: int, seed: int, epoch: int,
                  num_threads: int) -> Iterator[dict]:
  """This process's rows of every global training batch of one epoch (shuffled, remainder dropped).

  One process: `iterate_batches` itself. Several: the global batches are the ones a single process
  would form (same shuffle, same grouping), and each process decodes only its `process_rows` of each,
  so the assembled global batch, and with it the loss, equals the one-process run. `index` stays the
  position in `records`.
  """
  if jax.process_count() == 1:
    yield from iterate_batches(records, views, batch_size=batch_size, shuffle=True, seed=seed, epoch=epoch,
                               drop_remainder=True, num_threads=num_threads)
    return
  rows = epoch_rows(len(records), batch_size, seed, epoch)
  mine = rows.reshape(-1)  # [steps * local]: global record positions, batch by batch
  local = [records[i] for i in mine]
  for batch in iterate_batches(local, views, batch_size=rows.shape[1], shuffle=False,
                               drop_remainder=True, num_threads=num_threads):
    batch["index"] = mine[batch["index"]].astype(np.int32)  # position in `local` -> in `records`
    yield batch
