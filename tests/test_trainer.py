"""The trainer end to end on the digits demo data: outputs, resume after SIGKILL, resume on fewer devices,
two processes == one process, and the messages for bad settings."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest

from configs import digits
from dcv2_jax import config as config_lib
from dcv2_jax.checkpoint import restore_model_variables
from dcv2_jax.trainer import DeviceOutOfMemory, NonFiniteLoss, train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small, fast variant of the demo: 16px digits, one crop size, narrow ResNet-18, 22 steps an epoch.
OVERRIDES = {"data.image_size_digits": 16, "data.crops": ((16, 2, 0.4, 1.0),), "model.base_width": 8,
             "model.head_dims": (32, 16), "loss.num_clusters": (10, 10, 10), "num_epochs": 2,
             "checkpoint_every_steps": 5, "log_every_steps": 5, "eval_at_end": False, "keep_checkpoints": 20,
             # A gentle LR: runs that differ only in reduction order (devices, processes) then stay within
             # float tolerance of each other; at the demo's LR 4.8 such differences grow chaotically.
             "optim.lr": 0.3, "optim.warmup_start_lr": 0.03}


def small_config(**extra):
  c = digits.get_config()
  for key, value in {**OVERRIDES, **extra}.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def cli_args(workdir, **extra):
  args = [sys.executable, os.path.join(REPO, "train.py"), f"--config={REPO}/configs/digits.py", f"--workdir={workdir}"]
  for key, value in {**OVERRIDES, **extra}.items():
    args.append(f"--config.{key}={value}")
  return args


def env(devices):
  e = dict(os.environ)
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  e["JAX_PLATFORMS"] = "cpu"
  e["PYTHONPATH"] = REPO
  return e


def logged_step(metrics) -> int:
  """The highest step in a run's metrics.jsonl so far (a line still being written is skipped)."""
  steps = [0]
  for line in metrics.read_text().splitlines() if metrics.exists() else []:
    try:
      steps.append(json.loads(line).get("step", 0))
    except json.JSONDecodeError:
      pass
  return max(steps)


def assert_same_as_reference(workdir, reference_run):
  """A resumed run ends where the uninterrupted reference does: step 44, weights and centroids to 1e-6."""
  got, got_c, step = final_params(workdir)
  ref, ref_c, _ = final_params(reference_run)
  assert step == 44
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got_c, ref_c, rtol=1e-6, atol=1e-7)


def final_params(workdir):
  _, variables, centroids, step = restore_model_variables(workdir)
  return jax.tree.leaves(variables), centroids, step


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """2 epochs on 8 devices, uninterrupted, in this process."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  train_and_evaluate(small_config(), workdir)
  return workdir


def test_outputs_of_a_run(reference_run):
  records = [json.loads(line) for line in open(os.path.join(reference_run, "metrics.jsonl"))]
  steps = [r for r in records if "loss" in r]
  assert steps and all(k in steps[0] for k in ("step", "epoch", "loss", "lr", "img_per_s"))
  assert all(np.isfinite(r["loss"]) for r in steps)
  epochs = [r for r in records if "kmeans_s" in r]
  assert [r["epoch"] for r in epochs] == [0, 1]
  health = epochs[1]["clusters"]
  assert len(health["empty_clusters"]) == 3 and "nmi_prev" in health and "nmi_labels" in health
  table = np.load(os.path.join(reference_run, "assignments", "epoch_0001.npz"))["assignments"]
  assert table.shape == (3, 1438) and (table >= 0).sum(axis=1).tolist() == [22 * 64] * 3
  _, _, step = final_params(reference_run)
  assert step == 44
  assert os.path.exists(os.path.join(reference_run, "tensorboard"))
  assert json.load(open(os.path.join(reference_run, "config.json")))["model"]["base_width"] == 8


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(reference_run, tmp_path):
  workdir = str(tmp_path / "killed")
  proc = subprocess.Popen(cli_args(workdir), env=env(8), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  target = os.path.join(workdir, "checkpoints", "30")        # mid-epoch 1 (steps 22..43)
  deadline = time.time() + 300
  while not os.path.isdir(target) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.isdir(target), "the run ended before its step-30 checkpoint"
  assert not os.path.isdir(os.path.join(workdir, "checkpoints", "44"))
  done = subprocess.run(cli_args(workdir), env=env(8), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resumed from step" in done.stderr
  assert_same_as_reference(workdir, reference_run)


def test_sigterm_saves_the_current_step_then_resume_equals_uninterrupted(reference_run, tmp_path):
  """A scheduler's SIGTERM mid-epoch: the run saves the step it is at (no regular checkpoint is due:
  checkpoint_every_steps is 1000), exits with 143, and the same command finishes like an uninterrupted run."""
  workdir = tmp_path / "preempted"
  proc = subprocess.Popen(cli_args(str(workdir), checkpoint_every_steps=1000), env=env(8),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics, deadline = workdir / "metrics.jsonl", time.time() + 300
  while logged_step(metrics) < 25 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-3000:]
  saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert saved[0] == 22 and 25 <= saved[-1] < 44, saved      # epoch 0's end, then the preemption step
  assert "run the same command to resume" in err
  assert "memory bank: 5/22 steps" in err and "memory bank: 20/22 steps" in err    # the initial pass's progress
  assert json.loads(metrics.read_text().splitlines()[-1]) == {"step": saved[-1], "preempted": True}
  done = subprocess.run(cli_args(str(workdir), checkpoint_every_steps=1000), env=env(8), capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"resumed from step {saved[-1]}" in done.stderr
  assert_same_as_reference(str(workdir), reference_run)


def test_resume_on_four_devices(reference_run, tmp_path):
  """The 8-device checkpoint of epoch 2 continues on 4 devices (bank re-sharded) like it does on 8."""
  runs = {}
  for n in (8, 4):
    workdir = str(tmp_path / f"on{n}")
    shutil.copytree(reference_run, workdir)
    train_and_evaluate(small_config(num_epochs=3), workdir, devices=jax.devices()[:n])
    runs[n] = final_params(workdir)
  assert runs[4][2] == runs[8][2] == 66
  for a, b in zip(runs[4][0], runs[8][0]):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4)


def test_two_processes_equal_one_process(tmp_path):
  # One epoch of 5 steps (batch 256), a checkpoint after every step. The two all-reduce orders (gloo across
  # processes vs in-process) differ by float rounding, which training amplifies a few times a step, so the
  # exact comparison is after the first step: one step moves the weights by ~3e-4 relative (LARC, lr 0.3),
  # so any difference in what the step computed (data, statistics, gradients) would exceed rtol 1e-5.
  extra = {"num_epochs": 1, "batch_size": 256, "checkpoint_every_steps": 1}
  one = str(tmp_path / "one")
  r = subprocess.run(cli_args(one, **extra), env=env(4), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  two = str(tmp_path / "two")
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(cli_args(two, **extra) + ["--coordinator_address=127.0.0.1:%d" % port,
                                                          "--num_processes=2", f"--process_id={i}"],
                            env=env(2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  errs = [p.communicate(timeout=600)[1] for p in procs]
  assert all(p.returncode == 0 for p in procs), errs[0][-3000:] + errs[1][-3000:]
  assert "2 process(es), 4 device(s)" in errs[0]
  # atol 1e-6: a Linear bias in front of BatchNorm has a true gradient of 0, so LARC scales pure rounding
  # noise up to its trust-ratio step (~1e-7 here); a real difference moves conv weights by ~3e-5.
  first = [final_params(os.path.join(w, "checkpoints", "1"))[0] for w in (one, two)]
  for x, y in zip(*first):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  a, ac, sa = final_params(one)
  b, bc, sb = final_params(two)
  assert sa == sb == 5
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=1e-2, atol=1e-3)
  np.testing.assert_allclose(ac, bc, rtol=1e-2, atol=1e-3)


def test_sigterm_to_one_of_two_processes_saves_one_step_on_both_then_a_lost_process_is_named(tmp_path):
  """Multi-host preemption: SIGTERM reaches one process only; its flag travels through the next train step,
  so both processes save the same step (a collective orbax save) and exit 143. The same command resumes
  both; then process 1 is SIGKILLed: process 0 stops within the peer timeout (10 s here) with our one line
  (which process, the last checkpoint, how to resume), and the same command once more ends the run (3 epochs:
  ample steps left after each fault)."""
  workdir = tmp_path / "two"
  port = portpicker.pick_unused_port()
  args = lambda i: cli_args(str(workdir), checkpoint_every_steps=1000, num_epochs=3) + [
      f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}", "--peer_timeout=10"]
  procs = [subprocess.Popen(args(i), env=env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  metrics, deadline = workdir / "metrics.jsonl", time.time() + 300
  while logged_step(metrics) < 25 and all(p.poll() is None for p in procs) and time.time() < deadline:
    time.sleep(0.02)
  procs[1].send_signal(signal.SIGTERM)
  errs = [p.communicate(timeout=300)[1] for p in procs]
  assert [p.returncode for p in procs] == [143, 143], errs[0][-2000:] + errs[1][-2000:]
  saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert saved[0] == 22 and 25 <= saved[-1] < 66, saved
  assert all(f"checkpoint of step {saved[-1]} is saved" in e for e in errs)

  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(args(i), env=env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  deadline = time.time() + 300
  while logged_step(metrics) < saved[-1] + 5 and all(p.poll() is None for p in procs) and time.time() < deadline:
    time.sleep(0.02)
  procs[1].kill()
  killed_at = time.time()
  err0 = procs[0].communicate(timeout=120)[1]
  procs[1].communicate(timeout=60)
  assert procs[0].returncode not in (0, None) and time.time() - killed_at < 45, err0[-2000:]
  last = err0.strip().splitlines()[-1]
  assert last.startswith("error: lost process 1") and "run the same command to resume" in last, err0[-2000:]
  assert f"resumed from step {saved[-1]}" in err0 and "Traceback" not in err0
  saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert f"The last checkpoint is step {saved[-1]} " in last

  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(args(i), env=env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  errs = [p.communicate(timeout=600)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
  assert f"resumed from step {saved[-1]}" in errs[0]
  assert final_params(str(workdir))[2] == 66


def test_impossible_settings_fail_before_compiling():
  c = small_config()
  c.batch_size = 60
  c.loss.crops_for_mb = (0, 5)
  c.loss.num_clusters = (5000, 5000, 5000)
  c.model.head_input_dim = 100
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c, 1438, 1438 // 60, num_devices=8, num_processes=1)
  msg = str(e.value)
  for part in ("not divisible by the 8 devices", "crops_for_mb=(0, 5)", "more clusters than memory-bank rows",
               "head_input_dim=100"):
    assert part in msg


def test_trainer_rejects_bad_config_before_compiling(tmp_path, monkeypatch):
  from dcv2_jax import trainer
  monkeypatch.setattr(trainer, "jit_epoch_steps", lambda *a: pytest.fail("compiled a bad config"))
  with pytest.raises(config_lib.ConfigError, match="more clusters"):
    train_and_evaluate(small_config(**{"loss.num_clusters": (2000, 2000, 2000)}), str(tmp_path))


def test_out_of_device_memory_says_what_to_lower(tmp_path, monkeypatch):
  """XLA's RESOURCE_EXHAUSTED (here raised by a stand-in for the first step) becomes an error that names
  the batch per device and the setting to change; other errors pass through unchanged."""
  from dcv2_jax import epoch_steps

  def out_of_memory(*args):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 68719476736 "
                                     "bytes.")

  monkeypatch.setattr(epoch_steps, "bank_init_step", out_of_memory)
  with pytest.raises(DeviceOutOfMemory, match=r"8 samples \(2x16 crops each\) per device: global batch 64 on 8") as e:
    train_and_evaluate(small_config(), str(tmp_path / "oom"))
  assert "--config.per_device_batch_size=4" in str(e.value) and "68719476736 bytes" in str(e.value)

  monkeypatch.setattr(epoch_steps, "bank_init_step", lambda *a: (_ for _ in ()).throw(KeyError("other")))
  with pytest.raises(KeyError, match="other"):
    train_and_evaluate(small_config(), str(tmp_path / "other"))


def test_unknown_config_key_lists_valid_keys(tmp_path):
  r = subprocess.run(cli_args(str(tmp_path)) + ["--config.loss.temprature=0.2"], env=env(1), capture_output=True,
                     text=True, timeout=120)
  assert r.returncode != 0
  assert "unknown config key --config.loss.temprature" in r.stderr and "loss.temperature" in r.stderr
  assert "valid keys:" in r.stderr and "model.sync_bn.group_size" in r.stderr


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  c = small_config(**{"optim.lr": 1e30, "optim.warmup_start_lr": 1e30, "checkpoint_every_steps": 1})
  with pytest.raises(NonFiniteLoss, match=r"at step \d+"):
    train_and_evaluate(c, str(tmp_path))
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  for s in steps:    # every checkpoint that was written holds finite weights
    leaves, _, _ = final_params(str(tmp_path / "checkpoints" / str(s)))
    assert all(np.all(np.isfinite(x)) for x in leaves)


def test_partly_written_checkpoint_is_never_loaded(reference_run, tmp_path):
  from dcv2_jax.checkpoint import Checkpoints
  workdir = str(tmp_path / "partial")
  shutil.copytree(reference_run, workdir)
  # What a save killed half-way leaves behind: orbax's temporary directory, never renamed to "<step>".
  partial = os.path.join(workdir, "checkpoints", "60.orbax-checkpoint-tmp-1234567")
  os.makedirs(os.path.join(partial, "state"))
  open(os.path.join(partial, "state", "garbage"), "w").write("half a checkpoint")
  ckpts = Checkpoints(workdir)
  assert ckpts.latest_step() == 44
  ckpts.close()
  _, _, step = final_params(workdir)
  assert step == 44


def test_damaged_newest_checkpoint_warns_once_then_resumes_from_the_previous_one(reference_run, tmp_path, caplog):
  """The newest checkpoint's largest data file cut short (a copy that broke after the save): the same command
  warns once, moves it aside, resumes from the checkpoint before it and ends where the uninterrupted run does."""
  workdir = str(tmp_path / "damaged")
  shutil.copytree(reference_run, workdir)
  newest = os.path.join(workdir, "checkpoints", "44", "state")
  largest = max((os.path.join(d, f) for d, _, fs in os.walk(newest) for f in fs), key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  with caplog.at_level("WARNING"):
    train_and_evaluate(small_config(), workdir)
  warned = [r.getMessage() for r in caplog.records if "cannot be read back" in r.getMessage()]
  assert len(warned) == 1 and "checkpoint 44" in warned[0]
  assert os.path.isdir(os.path.join(workdir, "damaged_checkpoints", "44"))
  assert any("resuming from checkpoint 40" in r.getMessage() for r in caplog.records)
  assert_same_as_reference(workdir, reference_run)


def test_a_full_disk_stops_the_run_with_one_line_and_keeps_the_checkpoints(tmp_path):
  """Saving into a filesystem that fills up: exit != 0, the last stderr line names the directory, the cause,
  the free space and the last complete checkpoint; no traceback on stderr (they are in train.log); the earlier
  checkpoints are intact. A 12 MB tmpfs holds the run's first checkpoints (1.6 MB each) but not 20 of them."""
  disk = tmp_path / "disk"
  disk.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk)], capture_output=True).returncode:
    pytest.fail("this test needs to mount a small tmpfs (root, as on the CI machine)")
  try:
    workdir = str(disk / "run")
    r = subprocess.run(cli_args(workdir), env=env(8), capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: saving checkpoint") and os.path.join(workdir, "checkpoints") in last
    assert "No space left on device" in last and "free there" in last and "the last complete checkpoint is step" in last
    assert "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr
    assert "checkpoints: each is about" in r.stderr                 # the warning before the first save
    good = int(last.split("the last complete checkpoint is step ")[1].split(":")[0])
    assert final_params(os.path.join(workdir, "checkpoints", str(good)))[2] == good
  finally:
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_bad_input_to_train_is_one_line_without_a_traceback(tmp_path):
  r = subprocess.run(cli_args(str(tmp_path)) + ["--config.loss.temperature=-1"], env=env(1), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: invalid configuration") and "loss.temperature=-1" in r.stderr


def test_undecodable_files_are_counted_reported_once_and_too_many_stop_the_run(tmp_path, caplog):
  """An image folder with 5% undecodable files: more than data.max_bad_fraction (1% by default) stops the run
  after the memory bank's pass with the count and examples; allowed (10%), every epoch's metrics count the
  skipped samples (the epoch's share of the bad files, exactly) and each file is reported once."""
  from PIL import Image
  from dcv2_jax.trainer import BadData
  rng = np.random.default_rng(0)
  root = tmp_path / "images"
  for i in range(200):
    folder = root / f"c{i % 4}"
    folder.mkdir(parents=True, exist_ok=True)
    if i % 20 == 7:
      (folder / f"bad_{i:03d}.jpg").write_bytes(b"not a jpeg")
    else:
      Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i:03d}.jpg")
  data = {"data.source": "image_folder", "data.path": str(root), "data.eval_split": ""}
  from dcv2_jax.data import Pipeline
  pipeline = Pipeline(config_lib.resolve(small_config(**data), 8)[0], 0, 1)
  bad = {i for i in range(len(pipeline.source)) if "bad_" in pipeline.source.describe(i)}
  want = [len(bad & set(pipeline.loader.epoch_order(e)[:192].tolist())) for e in (0, 1)]
  # The bank's pass reads epoch 0's samples: its count is epoch 0's.
  with pytest.raises(BadData, match=rf"{want[0]} of 192 samples \({100 * want[0] / 192:.1f}%\) in the memory bank's "
                                    r"initial pass could not be decoded, more than data.max_bad_fraction=0.01; for "
                                    r"example .*bad_.*UnidentifiedImageError"):
    train_and_evaluate(small_config(**data), str(tmp_path / "strict"))

  workdir = str(tmp_path / "lenient")
  caplog.clear()
  with caplog.at_level("WARNING"):
    train_and_evaluate(small_config(**data, **{"data.max_bad_fraction": 0.1}), workdir)
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  epochs = [r for r in records if "bad_samples" in r]
  assert [r["bad_samples"] for r in epochs] == want and epochs[-1]["bad_samples_total"] == sum(want)
  reports = [r.getMessage() for r in caplog.records if "skipping undecodable sample" in r.getMessage()]
  assert len(reports) == len(set(reports)) == 10           # each file once, although every epoch skips it
