"""Moves per-process numpy batches onto the device mesh ahead of the train step, in a background thread.

The host-to-device copy of batch k+1 overlaps step k. `jax.make_array_from_process_local_data` (through
`sharding.local_batch_to_global`) assembles each process's rows into one global array sharded on `data`.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

_END = object()
# Batches queued on the device ahead of the step. On the device at once beside the step's own batch: these, and one
# more in the producer's hand, placed and waiting for a free slot.
QUEUED_BATCHES = 2


class _Raised:
  def __init__(self, error: BaseException):
    self.error = error


class DevicePrefetcher:
  """Iterator of global batches, `size` of them prepared ahead."""

  def __init__(self, iterator: Iterator, mesh, size: int = QUEUED_BATCHES):
    # Late: importing dcv2_jax.data must not import jax, the grain worker processes import it too.
    from dcv2_jax import sharding  # pylint: disable=g-import-not-at-top

    self._source = iterator
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
    self._stop = threading.Event()
    self._done = False

    def produce():
      try:
        for batch in iterator:
          if not self._put(sharding.local_batch_to_global(batch, mesh)):
            return
        self._put(_END)
      except BaseException as e:  # pylint: disable=broad-except  (re-raised in the consumer)
        self._put(_Raised(e))

    self._thread = threading.Thread(target=produce, name="device_prefetch", daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    """Blocks until `item` is queued (True) or close() was called (False); polls so close() never hangs."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def __iter__(self):
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    item = self._queue.get()
    if item is _END:
      self._done = True
      raise StopIteration
    if isinstance(item, _Raised):
      self._done = True
      raise item.error
    return item

  def close(self):
    """Stops the thread (the wrapped iterator is left to its owner to close)."""
    self._stop.set()
    self._thread.join(timeout=10)
    self._done = True
    while not self._queue.empty():   # drop prefetched device batches now, not when this object dies
      self._queue.get_nowait()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def device_prefetch(iterator: Iterator, mesh, size: int = QUEUED_BATCHES) -> DevicePrefetcher:
  """Global jax arrays (batch axis sharded over `mesh`'s data axis) from per-process numpy batches."""
  return DevicePrefetcher(iterator, mesh, size)
