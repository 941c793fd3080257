"""Checkpoints: the orbax layout of the old code still reads, a damaged checkpoint is moved aside and the
next older one restored, another run's state is refused without moving anything, a failing save (a full
disk) raises one error that names the directory, the cause, the free space and the last good step."""
import errno
import logging
import os
import subprocess
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dcv2_jax.run import checkpoint


def small_state(seed=0, rows=64):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(rows, 32)), jnp.float32), "step": jnp.asarray(seed, jnp.int32)}


def abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def saved_run(workdir, steps=(1, 2, 3)):
  ckpts = checkpoint.Checkpoints(str(workdir), keep=5, async_save=False)
  for s in steps:
    ckpts.save(s, small_state(s), {"step": s})
  ckpts.close()
  return {s: small_state(s) for s in steps}


def largest_data_file(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
  return max(files, key=os.path.getsize)


def test_reads_a_checkpoint_written_with_the_legacy_orbax_arguments(tmp_path):
  """The old code's CheckpointManager(item_names=..., max_to_keep=...) layout restores with today's."""
  directory = tmp_path / "run" / checkpoint.CHECKPOINT_DIR
  legacy = ocp.CheckpointManager(str(directory), item_names=("state", "meta"),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=3, create=True,
                                                                      enable_async_checkpointing=False))
  legacy.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(small_state(7)),
                                         meta=ocp.args.JsonSave({"step": 7})))
  legacy.close()
  ckpts = checkpoint.Checkpoints(str(tmp_path / "run"))
  state, meta = ckpts.restore(abstract(small_state()))
  ckpts.close()
  assert meta == {"step": 7}
  np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(small_state(7)["w"]))


def test_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_restored(tmp_path, caplog):
  states = saved_run(tmp_path)
  path = largest_data_file(tmp_path / "checkpoints" / "3")
  with open(path, "r+b") as f:          # what a copy that broke after the save's commit leaves
    f.truncate(os.path.getsize(path) // 3)
  ckpts = checkpoint.Checkpoints(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    state, meta = ckpts.restore(abstract(small_state()))
  ckpts.close()
  assert meta == {"step": 2}
  np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(states[2]["w"]))
  warned = [r.getMessage() for r in caplog.records if "cannot be read back" in r.getMessage()]
  assert len(warned) == 1 and "checkpoint 3" in warned[0]
  assert os.path.isdir(tmp_path / checkpoint.DAMAGED_DIR / "3")          # moved, never deleted
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


def test_no_readable_checkpoint_is_one_error_listing_them(tmp_path):
  saved_run(tmp_path, steps=(1, 2))
  for s in (1, 2):
    os.remove(largest_data_file(tmp_path / "checkpoints" / str(s)))
  ckpts = checkpoint.Checkpoints(str(tmp_path))
  with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint in .* reads back.*step 2: .*step 1: "):
    ckpts.restore(abstract(small_state()))
  ckpts.close()


def test_another_runs_state_is_refused_and_nothing_is_moved(tmp_path):
  saved_run(tmp_path)
  ckpts = checkpoint.Checkpoints(str(tmp_path))
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match="other shapes"):
    ckpts.restore(abstract(small_state(rows=65)))
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match="custom"):
    def refuse(meta):
      raise checkpoint.IncompatibleCheckpoint(f"custom refusal of step {meta['step']}")
    ckpts.restore(abstract(small_state()), check=refuse)
  ckpts.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2", "3"]
  assert not os.path.exists(tmp_path / checkpoint.DAMAGED_DIR)


@pytest.fixture
def small_disk(tmp_path):
  """A 2 MB filesystem: a tmpfs where this user may mount one (root on the CI machine), else a plain folder
  whose writes fail with ENOSPC once 2 MB are used (the same error, simulated)."""
  mount = tmp_path / "disk"
  mount.mkdir()
  mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                                 capture_output=True).returncode == 0
  yield mount, mounted
  if mounted:
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_save_into_a_full_disk_names_directory_cause_space_and_last_good_step(small_disk, monkeypatch):
  disk, mounted = small_disk
  workdir = disk / f"run-{uuid.uuid4().hex[:6]}"
  ckpts = checkpoint.Checkpoints(str(workdir), keep=50)
  ckpts.save(1, small_state(1, rows=1024), {"step": 1})       # 128 KB: fits
  ckpts.wait()
  if not mounted:
    real = ckpts.manager.save
    monkeypatch.setattr(ckpts.manager, "save", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")) if a[0] > 1 else real(*a, **k))
  with pytest.raises(checkpoint.CheckpointSaveError) as err:
    for s in range(2, 40):                                   # 38 x 128 KB do not fit in 2 MB
      ckpts.save(s, small_state(s, rows=1024), {"step": s})
    ckpts.wait()
  ckpts.close()
  message = str(err.value)
  assert str(workdir / "checkpoints") in message and "No space left on device" in message
  assert " free there" in message and "the last complete checkpoint is step" in message
  last = int(message.split("the last complete checkpoint is step ")[1].split(":")[0])
  reader = checkpoint.Checkpoints(str(workdir))
  state, meta = reader.restore(abstract(small_state(rows=1024)))     # the earlier checkpoints are intact
  reader.close()
  assert meta["step"] == last >= 1
  np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(small_state(last, rows=1024)["w"]))


def test_warns_before_the_first_save_when_the_disk_is_too_small(tmp_path, monkeypatch, caplog):
  ckpts = checkpoint.Checkpoints(str(tmp_path), keep=3)
  monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 3 * checkpoint.tree_bytes(small_state()))
  with caplog.at_level(logging.WARNING):
    ckpts.warn_if_disk_too_small(abstract(small_state()), keep=3)
  monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 10 * checkpoint.tree_bytes(small_state()))
  ckpts.warn_if_disk_too_small(abstract(small_state()), keep=3)
  ckpts.close()
  warned = [r.getMessage() for r in caplog.records if "checkpoints: each is about" in r.getMessage()]
  assert len(warned) == 1 and "3 are kept" in warned[0]
