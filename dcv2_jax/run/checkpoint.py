"""Step 5: checkpoints with orbax, the whole DCv2 state plus a JSON record (config, step, data size).

Orbax writes each step into a temporary directory and renames it when complete, so a run killed while
saving leaves no checkpoint that looks finished: a partly written checkpoint is never loaded. Arrays are
restored onto whatever mesh the restoring run has (the memory bank just re-shards), which is how a run
saved on 8 devices resumes on 4.

Faults, each named in one line:
  * a checkpoint that is complete but does not read back (a data file truncated or corrupted after the
    save: a disk that filled up, a broken copy) is moved aside to <workdir>/damaged_checkpoints/<step>
    (never deleted) with one warning, and the next older one is restored;
  * a checkpoint whose arrays have other shapes than this run's state (another model or dataset in the
    same workdir) is not damage: that stops with a ConfigError before anything is moved;
  * a save that fails (disk full, permission, quota) raises CheckpointSaveError, whose message names the
    directory, the cause, the free space and the last complete checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from dcv2_jax import config as config_lib
from dcv2_jax.run import distributed

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"


class CheckpointError(RuntimeError):
  """No checkpoint of a workdir can be read, or one cannot be written: the message says what to do."""


class CheckpointSaveError(CheckpointError):
  pass


class IncompatibleCheckpoint(config_lib.ConfigError):
  """The workdir holds a run of another model or dataset (not damage: nothing is moved)."""


@dataclasses.dataclass(frozen=True)
class TrainRecord:
  """The JSON saved beside each training checkpoint's state (the "meta" item): what a resumed run, export and
  load_trunk read back."""
  step: int
  num_examples: int
  global_batch: int
  config: str                       # the run's resolved config, as JSON
  bad_samples_total: int = 0        # samples skipped as undecodable since the run began (all epochs)

  @classmethod
  def from_json(cls, meta: dict) -> "TrainRecord":
    return cls(**{f.name: meta[f.name] for f in dataclasses.fields(cls) if f.name in meta})

  def check_same_data(self, num_examples: int, global_batch: int, workdir: str) -> None:
    """IncompatibleCheckpoint unless the checkpoint's run had this many samples and this global batch."""
    if (self.num_examples, self.global_batch) != (num_examples, global_batch):
      raise IncompatibleCheckpoint(
          f"{workdir} holds a run with {self.num_examples} samples and global batch {self.global_batch}; this "
          f"config has {num_examples} and {global_batch}. Use a new workdir.")


def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  # Two items per step: "state" (the TrainState pytree, sharded arrays) and "meta" (JSON).
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
    registry.add("state", args, ocp.StandardCheckpointHandler)
  for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
    registry.add("meta", args, ocp.JsonCheckpointHandler)
  return registry


_OS_CAUSES = re.compile(r"No space left on device|Disk quota exceeded|Permission denied|Read-only file system|"
                        r"Too many open files|Input/output error")


def _save_cause(error: BaseException) -> str:
  """The reason a write failed, as the OS put it if it is in there (buried in orbax's and TensorStore's
  wrapping), else the error's first line."""
  chain, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  for e in chain:
    found = _OS_CAUSES.search(str(e)) or (isinstance(e, OSError) and e.strerror and _OS_CAUSES.search(e.strerror))
    if found:
      return f"{found.group(0)}: {type(e).__name__}"
  return _first_line(chain[0], 200)


def _first_line(error: BaseException, limit: int = 300) -> str:
  text = " ".join(str(error).split()).split(" See full TensorStore details")[0]
  return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def free_bytes(path: str) -> int | None:
  """Free space on the filesystem holding `path` (or its nearest existing parent)."""
  while path and not os.path.exists(path):
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path or ".").free
  except OSError:
    return None


def format_bytes(n: float | None) -> str:
  if n is None:
    return "unknown"
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if n < 1024 or unit == "TB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024


def tree_bytes(tree) -> int:
  """Bytes of every array in a pytree of arrays or ShapeDtypeStructs (a checkpoint's size, roughly)."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _shape_multiset(tree) -> list[tuple]:
  return sorted((tuple(x.shape), str(np.dtype(x.dtype))) for x in jax.tree.leaves(tree))


class Checkpoints:
  """The checkpoints of one workdir: save every so often, restore the newest one that reads."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
    self.manager = ocp.CheckpointManager(
        self.directory, handler_registry=_registry(),
        # cleanup_tmp_directories: a save cut short (killed, disk full) leaves a temporary directory, never
        # loaded; the next run removes it, so its space comes back.
        options=ocp.CheckpointManagerOptions(preservation_policy=ocp.checkpoint_managers.LatestN(keep),
                                             create=True, enable_async_checkpointing=async_save,
                                             cleanup_tmp_directories=True))
    self._saving: int | None = None          # the step of an async save not yet known to be complete
    self._failed = False

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  # ----------------------------------------------------------------------------------------- save

  def save(self, step: int, state, meta: dict) -> None:
    """Starts saving `step` (asynchronously); an error of this or the previous save raises
    CheckpointSaveError."""
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # pylint: disable=broad-except  (OSError, orbax's wrapped errors, XLA's status)
      raise self._save_failed(self._saving if self._saving is not None else step, e) from e
    self._saving = step

  def wait(self) -> None:
    """Blocks until the last save is complete on disk; its error raises CheckpointSaveError."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(self._saving, e) from e
    self._saving = None

  def _save_failed(self, step, error) -> CheckpointSaveError:
    self._failed = True
    try:
      self.manager.reload()
      last = max((s for s in self.manager.all_steps() if s != step), default=None)
    except Exception:  # pylint: disable=broad-except  (the directory itself may be gone)
      last = None
    where = (f"the last complete checkpoint is step {last}: run the same command to resume from it once the "
             "disk has space" if last is not None else "no checkpoint of this run is complete yet")
    return CheckpointSaveError(
        f"saving checkpoint {step} to {self.directory} failed ({_save_cause(error)}); "
        f"{format_bytes(free_bytes(self.directory))} free there; {where}")

  def warn_if_disk_too_small(self, abstract_state, keep: int) -> None:
    """Before the first save: warn when keep + 1 checkpoints (one being written while the oldest is still
    kept) would not fit in the free space."""
    size, free = tree_bytes(abstract_state), free_bytes(self.directory)
    if free is not None and free < size * (keep + 1):
      logging.warning("checkpoints: each is about %s and %d are kept (+1 being written), but only %s is free "
                      "in %s: saves will fail when the disk fills (lower keep_checkpoints or free space)",
                      format_bytes(size), keep, format_bytes(free), self.directory)

  # -------------------------------------------------------------------------------------- restore

  def restore(self, abstract_state, check=None):
    """(state, meta) of the newest checkpoint that reads back, or None when there is none.

    A checkpoint that fails to read is moved aside (one warning) and the next older one is tried; when
    none reads, CheckpointError lists them. A checkpoint of another state layout raises
    IncompatibleCheckpoint, and so may `check(meta)`, called before any array is read.
    """
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        if check is not None:
          check(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        saved = self.manager.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)
        if saved is not None and _shape_multiset(saved) != _shape_multiset(abstract_state):
          raise IncompatibleCheckpoint(
              f"{self.directory}/{step} holds a state of other shapes than this run's (another model, number of "
              "clusters, dataset or global batch in the same workdir): use a new --workdir, or the config "
              "that wrote it (its config.json)")
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 meta=ocp.args.JsonRestore()))
        if damaged:
          logging.warning("resuming from checkpoint %d, the newest that reads back", step)
        return out["state"], out["meta"]
      except IncompatibleCheckpoint:
        raise
      except Exception as e:  # pylint: disable=broad-except  (truncated files: OUT_OF_RANGE, ValueError, ...)
        damaged.append((step, _first_line(e)))
        moved = self._move_aside(step)
        logging.warning("checkpoint %d cannot be read back (%s); moved it to %s and trying the next older one",
                        step, damaged[-1][1], moved)
    if damaged:
      raise CheckpointError(
          f"no checkpoint in {self.directory} reads back; each was moved to "
          f"{os.path.join(self.workdir, DAMAGED_DIR)}: " + "; ".join(f"step {s}: {r}" for s, r in damaged)
          + ". Start afresh with a new --workdir (or copy intact checkpoints back).")
    return None

  def _move_aside(self, step: int) -> str:
    target = os.path.join(self.workdir, DAMAGED_DIR, f"{step}")
    if os.path.exists(target):
      target += f".{int(time.time())}"
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.replace(os.path.join(self.directory, str(step)), target)
    distributed.barrier(f"checkpoint_moved/{step}")
    self.manager.reload()
    return target

  def restore_meta(self) -> dict | None:
    """The JSON record of the newest complete checkpoint alone, or None."""
    step = self.manager.latest_step()
    if step is None:
      return None
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def close(self) -> None:
    """Waits for the last save (raising CheckpointSaveError if it failed), then releases orbax's threads.
    After a failed save, only releases: the error was raised already."""
    try:
      if not self._failed:
        self.wait()
    finally:
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except
        if not self._failed:
          raise


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
                                  handler_registry=_registry())
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{directory}: no complete checkpoint found")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    item_meta = manager.item_metadata(step)["state"]
    single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    # Target = the saved shapes on one local device: restores whatever mesh (or process count) saved it.
    tree = getattr(item_meta, "tree", item_meta)
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=single), tree)
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
  finally:
    manager.close()
  to_np = lambda t: jax.tree.map(np.asarray, t)
  config = config_lib.from_saved(json.loads(TrainRecord.from_json(meta).config))
  variables = {"params": to_np(state["params"]), "batch_stats": to_np(state["batch_stats"])}
  return config, variables, np.asarray(state["centroids"]), int(np.asarray(state["step"]))
