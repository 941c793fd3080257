"""grain iterators over our batch loaders, and the care their worker processes need.

`grain_iterator(loader, first, stop, ...)` prefetches loader(first), ..., loader(stop - 1) in order, in
`num_workers` processes (grain's mp_prefetch) or in threads of this process (num_workers=0). What grain leaves
to its user, done here: every batch's shared memory is released on every exit path (`unlink_shared_memory` as
each batch arrives, `close` for the batches prefetched and never read, and an exit hook for iterators nobody
closed), and every worker ends when its parent process dies (a SIGKILL by the kernel's out-of-memory killer
left them running, adopted by init, holding their memory).
"""
from __future__ import annotations

import atexit
import gc
import multiprocessing
import os
import threading
import weakref

import grain
from absl import flags


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
  """grain worker initializer: the worker ends when the process that started it dies.

  Without it, a worker blocked on its full output queue outlives a trainer killed by SIGKILL (the kernel's
  out-of-memory killer), adopted by init, holding its memory; and the trainer's resource tracker, which unlinks
  the shared memory left behind once every process it serves has gone, waits for it too. Linux's
  PR_SET_PDEATHSIG would not do: it fires when the *thread* that started the worker ends, and grain starts its
  workers from helper threads. multiprocessing's parent sentinel (a pipe whose write end only the parent
  process holds) reports the end of the parent process itself.
  """
  del worker_index, worker_count
  parent = multiprocessing.parent_process()
  if parent is None:   # not started by multiprocessing (grain's thread fallback on free-threaded Python)
    return

  def exit_when_parent_ends():
    parent.join()      # returns once the parent has exited (or dropped this worker without stopping it)
    os._exit(1)        # at once: a clean exit could block, flushing a queue into a pipe that nobody reads

  threading.Thread(target=exit_when_parent_ends, name="exit-with-parent", daemon=True).start()


def unlink_shared_memory(batch: dict) -> None:
  """Removes the shared-memory names of a batch that came from a grain worker; its arrays stay valid here.

  A worker copies each array of a batch into a POSIX shared-memory segment; grain (up to at least 0.2.18)
  unlinks the segment when the main process's array is garbage-collected, in a background thread pool. But the
  last batch of every grain stream is held by a reference cycle: the StopIteration that ended the stream keeps,
  through its traceback, the frame of grain's prefetch thread whose local variable is that batch. Only the
  cyclic garbage collector frees it, in practice at interpreter exit, after multiprocessing has terminated that
  thread pool: its segments were never unlinked, and Python's resource_tracker reported them at every exit
  ("There appear to be N leaked shared_memory objects", N = the arrays of one batch). A segment can be
  unlinked while mapped (the mapping stays valid, the memory is freed with the last mapping), so unlinking on
  arrival leaves no name behind, whoever holds the batch afterwards and however the process ends.
  """
  for value in batch.values():
    for leaf in value if isinstance(value, (list, tuple)) else (value,):
      if getattr(leaf, "_unlink_on_del", False):   # grain's SharedMemoryArray, to be unlinked by this process
        leaf.shm.unlink()
        leaf._unlink_on_del = False   # pylint: disable=protected-access  (grain's __del__ would unlink it again)


# The grain iterators with worker processes that are not closed yet (weakly: an iterator dropped unclosed is
# grain's to clean up).
_open_grain_iterators = weakref.WeakSet()


def _unlink_dropped_batches() -> None:
  """Unlinks the shared memory of the batches a closed grain iterator had prefetched and not handed out."""
  # Once a stream has reached its end (or a worker failed), grain keeps the last batch it read in a reference
  # cycle (see unlink_shared_memory): only the garbage collector frees it, and with it its shared memory.
  gc.collect()
  # grain unlinks a freed batch's segments in a background pool (one thread, in order), which multiprocessing
  # terminates at exit, dropping what is still queued: a no-op task returns once every earlier unlink ran.
  pool = getattr(grain.multiprocessing.SharedMemoryArray, "_del_thread_pool", None)
  if pool is not None:
    try:
      pool.apply(int)
    except ValueError:   # "Pool not running": terminated at exit already, nothing is left to wait for
      pass


def close(it) -> None:
  """Stops a grain iterator's workers and releases the batches it had prefetched but not handed out."""
  it.close()
  if it in _open_grain_iterators:   # it had workers (without, nothing is in shared memory)
    _open_grain_iterators.discard(it)
    _unlink_dropped_batches()


@atexit.register
def _close_open_grain_iterators() -> None:
  """At exit, closes the iterators left open (an exception that skipped a close, an abandoned evaluation loop).

  grain's own exit-time close runs after multiprocessing has stopped the thread that unlinks shared memory,
  so whatever it releases then leaks. atexit runs the last registered first: this (registered after
  `import grain` set up multiprocessing's exit function) runs before it.
  """
  for it in list(_open_grain_iterators):
    it.close()
  _unlink_dropped_batches()


def grain_iterator(loader, first: int, stop: int, num_workers: int, threads: int, prefetch: int):
  """A grain iterator over loader(first), ..., loader(stop - 1), in order, prefetched."""
  ds = grain.MapDataset.range(first, stop).map(loader)
  if num_workers > 0:
    # grain's worker start-up reads its absl flags; outside an absl app (notebooks, pytest, scripts) they
    # were never parsed, so take their defaults. An absl app (train.py) has parsed them already.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    # In a worker, one batch in flight per thread is enough; the worker's output buffer does the rest.
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(1, threads))
    it_ds = ds.to_iter_dataset(read).mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=max(1, prefetch)),
        worker_init_fn=_exit_with_parent)
    it = iter(it_ds)
    _open_grain_iterators.add(it)
    return it
  read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(prefetch, threads, 1))
  return iter(ds.to_iter_dataset(read))
