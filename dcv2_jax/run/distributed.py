"""Multi-host start-up (one JAX process per host, all joined before any device is used), the watch that
turns a lost process into one line on every survivor, and `jit`, whose programs start together everywhere.

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

Processes compile a program at different speeds (a loaded host may take minutes longer); the first to finish
then waits in the program's first collective, and gloo (the CPU collectives) gives up after 30 s
("Gloo context initialization failed: DEADLINE_EXCEEDED"). `jit` compiles each new input signature ahead and
meets every process at a coordination-service barrier before running it, so a program starts together
everywhere; the barrier waits as long as a compile may take, and PeerWatch ends it if a peer is lost.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS", "JOB_COMPLETION_INDEX")
DEFAULT_PEER_TIMEOUT = 120          # seconds without a peer's heartbeat before it counts as lost
# The share of each GPU's memory a training process claims for XLA (XLA_PYTHON_CLIENT_MEM_FRACTION; JAX's own
# default is 0.75, which leaves 20 GB of an 80 GB card unused). The rest holds the CUDA context, NCCL's buffers
# and cuDNN's handles. The GPU compile check plans batches against the same share (bench/gpu_compile.py).
DEVICE_MEMORY_FRACTION = 0.9
_KEY = "dcv2_jax/heartbeat/"
BARRIER_TIMEOUT_S = 3600            # how long the first process waits for the last (a compile, a restore)
_barrier_ids = itertools.count()    # one sequence in every process (see barrier)


def _multi_process_cluster() -> bool:
  if os.environ.get("SLURM_JOB_ID"):
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if os.environ.get("OMPI_COMM_WORLD_SIZE"):
    return int(os.environ["OMPI_COMM_WORLD_SIZE"]) > 1
  return any(os.environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "JOB_COMPLETION_INDEX"))


def claim_device_memory() -> None:
  """Lets XLA use DEVICE_MEMORY_FRACTION of each GPU, unless the environment says otherwise. Before any device
  is touched: XLA reads it when the GPU backend starts."""
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(DEVICE_MEMORY_FRACTION))


def jax_heartbeat_timeout(peer_timeout: float) -> int:
  """JAX's heartbeat timeout for our `peer_timeout`: a backstop behind PeerWatch, never ahead of it. A short
  peer timeout (15 s in the tests) would otherwise give JAX 30 s: a CI run on 2 loaded cores saw JAX abort
  both processes ("tasks 0, 1 stopped sending heartbeats") while they were compiling (at 2 x 10 s)."""
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
    """Up to `limit` seconds for a peer to count as lost (after a collective failed): who it was. [] as soon
    as every peer has beaten 3 times since the call: all alive, so the failure was not a lost process (a
    crashed peer may have beaten once more before it died, unseen here, and once more while this process
    was between polls)."""
    end, start = time.monotonic() + limit, self._counters()
    while time.monotonic() < end and not self.lost() and self._thread is not None:
      now = self._counters()
      if start and all(now[p] >= start[p] + 3 for p in start):
        return []
      time.sleep(0.5)
    return self.lost()

  def _counters(self) -> dict[int, int]:
    return {p: int(value or -1) for p, (value, _) in dict(self._seen).items()}

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


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
  """Every process waits here until all have arrived: the coordination service's barrier, not a collective
  (no device program, so no gloo timeout, and no compile of its own). A no-op in a single-process run. The
  barrier's id is `name` after a sequence number, the same on every process as long as all pass the same
  barriers in the same order (SPMD)."""
  client = _client() if jax.process_count() > 1 else None
  if client is not None:
    client.wait_at_barrier(f"dcv2_jax/{next(_barrier_ids)}/{name}", int(timeout_s * 1000))


def _signature(leaves, tree) -> tuple | None:
  """What makes jit compile anew, as far as our programs change it: the tree, each array's shape and dtype,
  static values (Python scalars are traced: their type only). Shardings are left out: hashing them costs
  ~2 ms a step for a ResNet-50 state, and our programs see the same ones every call (a change would
  compile once without the barrier, as a plain jit does). None while tracing (eval_shape, an outer jit)."""
  described = []
  for x in leaves:
    if isinstance(x, jax.core.Tracer):
      return None
    if hasattr(x, "shape") and hasattr(x, "dtype"):
      described.append((x.shape, x.dtype))
    else:
      described.append(type(x) if isinstance(x, (bool, int, float, complex)) else x)
  return tree, tuple(described)


class AlignedJit:
  """A `jax.jit` function whose first run of each input signature starts at the same time on every process
  (see the module doc): compile ahead, `barrier`, run. jit reuses that compilation for the call and every
  later one. A single process calls the jitted function directly."""

  def __init__(self, jitted: Callable, name: str):
    self.jitted, self.name = jitted, name
    self._compiled: set = set()

  def __call__(self, *args, **kwargs):
    if jax.process_count() > 1:
      signature = _signature(*jax.tree.flatten((args, kwargs)))
      if signature is not None and signature not in self._compiled:
        self.jitted.lower(*args, **kwargs).compile()
        barrier(f"compiled/{self.name}")
        self._compiled.add(signature)
    return self.jitted(*args, **kwargs)

  def __getattr__(self, attr: str) -> Any:      # lower, eval_shape, ... of the jitted function
    return getattr(self.jitted, attr)


def jit(fun: Callable, **jit_kwargs) -> AlignedJit:
  """jax.jit(fun, **jit_kwargs) for a program with collectives across processes (see AlignedJit)."""
  name = getattr(fun, "__name__", None) or getattr(getattr(fun, "func", None), "__name__", "program")
  return AlignedJit(jax.jit(fun, **jit_kwargs), name)


def sum_over_processes(count: int) -> int:
  """A host-side count (e.g. the pipeline's downscaled images: each process sees its own slice) summed over all
  processes; every process must call it at the same point."""
  if jax.process_count() == 1:
    return int(count)
  return int(np.sum(multihost_utils.process_allgather(np.asarray(count, np.int64))))
