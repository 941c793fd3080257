"""Multi-host start-up: one JAX process per host (or per GPU), all joined before any device is used.

jax.distributed.initialize() detects SLURM, Open MPI and Kubernetes (JobSet / indexed jobs) by itself;
explicit flags cover any other launcher. A single process needs none of it.
"""
from __future__ import annotations

import os

import jax
from absl import logging

_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS", "JOB_COMPLETION_INDEX")


def _multi_process_cluster() -> bool:
  if os.environ.get("SLURM_JOB_ID"):
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if os.environ.get("OMPI_COMM_WORLD_SIZE"):
    return int(os.environ["OMPI_COMM_WORLD_SIZE"]) > 1
  return any(os.environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "JOB_COMPLETION_INDEX"))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: str | None = None) -> None:
  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
  if not explicit and not _multi_process_cluster():
    return
  ids = [int(i) for i in local_device_ids.split(",")] if local_device_ids else None
  # SIGTERM is ours (checkpoint.PreemptionNotice): JAX's preemption service would catch it first.
  jax.config.update("jax_enable_preemption_service", False)
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=ids)
  logging.info("joined as process %d of %d (%d local devices)", jax.process_index(), jax.process_count(),
               jax.local_device_count())
