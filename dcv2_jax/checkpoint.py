"""Checkpoints with orbax: the whole DCv2 state plus a JSON record (config, data position, step).

Orbax writes each step into a temporary directory and renames it when complete, so a run killed while
saving leaves no checkpoint that looks finished: a partly written checkpoint is never loaded. Arrays are
restored onto whatever mesh the restoring run has (the memory bank just re-shards), which is how a run
saved on 8 devices resumes on 4.
"""
from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


class Checkpoints:
  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, abstract_state, step: int | None = None):
    """(state, meta) of `step` (default: the newest complete one), or None when there is none."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      return None
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def restore_meta(self, step: int | None = None) -> dict | None:
    """The JSON record of `step` (default: the newest complete checkpoint) alone, or None."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      return None
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


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


def abstract_like(shape_tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shape_tree, shardings)


def _manager_dir_and_step(path: str):
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
    return os.path.join(path, CHECKPOINT_DIR), None
  base = os.path.basename(path.rstrip("/"))
  if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
    return os.path.dirname(path), int(base)
  if os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path)):
    return path, None
  raise FileNotFoundError(f"{path}: not a dcv2-jax workdir (no {CHECKPOINT_DIR}/ inside) nor a checkpoint "
                          f"directory (<workdir>/{CHECKPOINT_DIR}/<step>)")


def restore_model_variables(path: str):
  """(config, {'params', 'batch_stats'}, centroids [H,K,D] numpy, step) from a workdir or checkpoint dir.

  Restores on the first local device as plain nested dicts, so it works on any machine (no mesh needed).
  """
  directory, step = _manager_dir_and_step(path)
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                 "meta": ocp.JsonCheckpointHandler()})
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{directory}: no complete checkpoint found")
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  item_meta = manager.item_metadata(step)["state"]
  device = jax.local_devices()[0]
  single = jax.sharding.SingleDeviceSharding(device)
  # Target = the saved shapes on one local device: restores whatever mesh (or process count) saved it.
  tree = item_meta.tree if hasattr(item_meta, "tree") else item_meta
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=single), tree)
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
  manager.close()
  to_np = lambda t: jax.tree.map(np.asarray, t)
  config = ml_collections.ConfigDict(json.loads(meta["config"]))
  variables = {"params": to_np(state["params"]), "batch_stats": to_np(state["batch_stats"])}
  return config, variables, np.asarray(state["centroids"]), int(np.asarray(state["step"]))
