"""SIGTERM, the notice a scheduler (SLURM, Kubernetes) sends before it stops a job, turned into a checkpoint.

The train loop saves the step every process agrees on and stops (trainer.py), so a preempted run loses
nothing; train.py then exits 143.
"""
from __future__ import annotations

import signal
import threading

import jax
import numpy as np


class PreemptionNotice:
  """SIGTERM, the notice a scheduler (SLURM, Kubernetes) sends before it stops a job: the trainer saves a
  checkpoint at a step every process agrees on, then stops, so a preempted run loses nothing.

  Every process catches the signal itself and `tag`s each train-step batch with its flag; the step takes
  the max over all rows, so every process reads the same `stop_requested` from the same step's metrics
  and stops at the same step. Why not JAX's preemption service (orbax's reached_preemption): it fires only
  at the exact step it derives from the steps processes last reported, which a resumed run (nothing
  reported yet) never reaches, and then it ignores every later SIGTERM; distributed.py turns it off.
  Use as a context manager: the previous handler is back on exit (a SIGTERM after training, during the
  evaluation, ends the process as usual).
  """

  def __init__(self):
    self.received = False
    self._previous = None
    self._tags = {}                    # (flag, shape, sharding) -> the device array: no upload per step

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
      if self._previous is None:        # a handler installed from C: nothing to restore but the default
        self._previous = signal.SIG_DFL
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_signal(self, signum, frame):
    del signum, frame
    self.received = True               # only a flag: the train loop logs and acts at the next step

  def tag(self, batch: dict) -> dict:
    """batch (global arrays) plus `stop` [global batch] int32: this process's rows hold its flag."""
    index = batch["index"]
    key = (self.received, index.shape, index.sharding)
    if key not in self._tags:
      local = np.full((index.shape[0] // jax.process_count(),), int(self.received), np.int32)
      self._tags[key] = jax.make_array_from_process_local_data(index.sharding, local)
    return dict(batch, stop=self._tags[key])
