"""Multi-host start-up (one JAX process per host, all joined before any device is used), and the watch that
turns a lost process into one line on every survivor.

jax.distributed.initialize() detects SLURM, Open MPI and Kubernetes (JobSet / indexed jobs) by itself;
explicit flags cover any other launcher. A single process needs none of it.

A lost process (a crashed or preempted host, a frozen machine, a cut network): JAX's own health check
notices it only after its heartbeat timeout and then aborts every process from C++ ("Terminating process
because the JAX distributed service detected fatal errors", a stack dump, no word of what is saved), and a
survivor blocked in a collective (NCCL) waits for that. `PeerWatch` gives every process a heartbeat in the
coordination service's key-value store; a peer whose heartbeat stops for `peer_timeout` seconds is lost, and
every survivor ends with our line (which process, the last checkpoint, "run the same command to resume").
JAX's own heartbeat timeout is set well above ours (twice ours, and at least a minute more), so ours fires
first, and a host that is merely slow (a long compile on a loaded machine stalls heartbeat threads for
seconds) is not aborted by JAX.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable

import jax
from absl import logging

_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS", "JOB_COMPLETION_INDEX")
DEFAULT_PEER_TIMEOUT = 120          # seconds without a peer's heartbeat before it counts as lost
_KEY = "dcv2_jax/heartbeat/"


def _multi_process_cluster() -> bool:
  if os.environ.get("SLURM_JOB_ID"):
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if os.environ.get("OMPI_COMM_WORLD_SIZE"):
    return int(os.environ["OMPI_COMM_WORLD_SIZE"]) > 1
  return any(os.environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "JOB_COMPLETION_INDEX"))


def jax_heartbeat_timeout(peer_timeout: float) -> int:
  """JAX's heartbeat timeout for our `peer_timeout`: a backstop behind PeerWatch, never ahead of it. A short
  peer timeout (10 s in the tests) would otherwise make JAX's 20 s: a CI run on 2 loaded cores saw JAX abort
  both processes ("tasks 0, 1 stopped sending heartbeats") while they were compiling."""
  return int(max(2 * peer_timeout, peer_timeout + 60))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: str | None = None,
               peer_timeout: float = DEFAULT_PEER_TIMEOUT) -> None:
  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
  if not explicit and not _multi_process_cluster():
    return
  ids = [int(i) for i in local_device_ids.split(",")] if local_device_ids else None
  # SIGTERM is ours (preemption.PreemptionNotice): JAX's preemption service would catch it first.
  jax.config.update("jax_enable_preemption_service", False)
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=ids,
                             heartbeat_timeout_seconds=jax_heartbeat_timeout(peer_timeout))
  logging.info("joined as process %d of %d (%d local devices)", jax.process_index(), jax.process_count(),
               jax.local_device_count())


def _client():
  # The coordination service's client that jax.distributed.initialize made: JAX keeps it in a private
  # module (no public accessor); without it there is no watch, and JAX's own health check remains.
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return getattr(jax_distributed.global_state, "client", None)


class PeerWatch:
  """A heartbeat per process and a thread that calls `on_lost(processes)` once some peer's stopped.

  Heartbeats are counters, not clock times (hosts' clocks differ): a peer is lost when its counter has not
  moved for `timeout` seconds of this process's clock, or when the coordination service (on process 0)
  cannot be reached for that long. A no-op in a single-process run. Use as a context manager.
  """

  def __init__(self, timeout: float, on_lost: Callable[[list[int]], None]):
    self.timeout, self.on_lost = float(timeout), on_lost
    self._client = _client() if jax.process_count() > 1 else None
    self._stop = threading.Event()
    self._thread = None
    self._seen: dict[int, tuple[str, float]] = {}     # process -> (its last counter, when it changed here)
    self._unreachable_since: float | None = None

  def __enter__(self):
    if self._client is not None:
      self._thread = threading.Thread(target=self._run, name="dcv2_peer_watch", daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()

  def lost(self) -> list[int]:
    """The processes whose heartbeat is older than the timeout, as far as this process has seen."""
    now = time.monotonic()
    if self._unreachable_since is not None and now - self._unreachable_since > self.timeout:
      return [0]
    return sorted(p for p, (_, since) in self._seen.items() if now - since > self.timeout)

  def wait_for_lost(self, limit: float) -> list[int]:
    """Up to `limit` seconds for a peer to count as lost (after a collective failed): who it was."""
    end = time.monotonic() + limit
    while time.monotonic() < end and not self.lost() and self._thread is not None:
      time.sleep(0.5)
    return self.lost()

  def _beat(self, count: int) -> None:
    me, now = jax.process_index(), time.monotonic()
    try:
      self._client.key_value_set(f"{_KEY}{me}", str(count), allow_overwrite=True)
      entries = self._client.key_value_dir_get(_KEY)
    except Exception:  # pylint: disable=broad-except  (the coordinator, process 0, is gone or cut off)
      if self._unreachable_since is None:
        self._unreachable_since = now
      return
    self._unreachable_since = None
    for key, value in entries:
      p = int(key.rsplit("/", 1)[-1])
      if p != me and self._seen.get(p, (None,))[0] != value:
        self._seen[p] = (value, now)
    for p in range(jax.process_count()):     # a peer that never beat counts from the watch's start
      if p != me:
        self._seen.setdefault(p, ("", now))

  def _run(self) -> None:
    count, interval = 0, max(0.5, min(5.0, self.timeout / 5))
    while not self._stop.wait(interval):
      count += 1
      self._beat(count)
      lost = self.lost()
      if lost and not self._stop.is_set():
        self.on_lost(lost)
        return
