"""The trainer as a command on several processes and on broken machines: two processes equal one, a SIGTERM
to one of two, a lost process, a full disk, bad input."""
import json
import os
import signal
import subprocess
import time

import numpy as np
import portpicker
import pytest

from run_helpers import cli_args, env, final_params, logged_step

@pytest.mark.parametrize("crops_on", ["host", "device"])
def test_two_processes_equal_one_process(tmp_path, crops_on):
  # One epoch of 5 steps (batch 256), a checkpoint after every step. The two all-reduce orders (gloo across
  # processes vs in-process) differ by float rounding, which training amplifies a few times a step, so the
  # exact comparison is after the first step: one step moves the weights by ~3e-4 relative (LARC, lr 0.3),
  # so any difference in what the step computed (data, statistics, gradients) would exceed rtol 1e-5.
  # crops_on=device: each process sends its images and crop boxes, the step cuts the crops; 12 px crops on a 12 px
  # canvas, so every 16 px digit is downscaled first and the epoch's count must add up over both processes.
  extra = {"num_epochs": 1, "batch_size": 256, "checkpoint_every_steps": 1, "data.crops_on": crops_on}
  if crops_on == "device":
    extra.update({"data.crops": ((12, 2, 0.4, 1.0),), "data.canvas_size": 12})
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
  if crops_on == "device":
    lines = [map(json.loads, open(os.path.join(w, "metrics.jsonl"))) for w in (one, two)]
    epochs = [[m for m in ms if "epoch_loss" in m] for ms in lines]
    assert [e[-1]["downscaled_samples"] for e in epochs] == [5 * 256, 5 * 256]
    assert "1280 of 1280 images were larger than the 12 px canvas" in r.stderr + errs[0]
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
  both; then process 1 is SIGKILLed: process 0 stops within the peer timeout (15 s here) with our one line
  (which process, the last checkpoint, how to resume), and the same command once more ends the run (3 epochs:
  ample steps left after each fault)."""
  workdir = tmp_path / "two"
  port = portpicker.pick_unused_port()
  args = lambda i: cli_args(str(workdir), checkpoint_every_steps=1000, num_epochs=3) + [
      f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}", "--peer_timeout=15"]
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


def test_unknown_config_key_lists_valid_keys(tmp_path):
  r = subprocess.run(cli_args(str(tmp_path)) + ["--config.loss.temprature=0.2"], env=env(1), capture_output=True,
                     text=True, timeout=120)
  assert r.returncode != 0
  assert "unknown config key --config.loss.temprature" in r.stderr and "loss.temperature" in r.stderr
  assert "valid keys:" in r.stderr and "model.sync_bn.group_size" in r.stderr


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
    err = r.stderr[-4000:]
    assert r.returncode != 0, err
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: saving checkpoint") and os.path.join(workdir, "checkpoints") in last, err
    assert "No space left on device" in last and "free there" in last and "the last complete checkpoint is step" in last, err
    assert "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr, err
    assert "checkpoints: each is about" in r.stderr, err             # the warning before the first save
    good = int(last.split("the last complete checkpoint is step ")[1].split(":")[0])
    assert final_params(os.path.join(workdir, "checkpoints", str(good)))[2] == good
  finally:
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_bad_input_to_train_is_one_line_without_a_traceback(tmp_path):
  r = subprocess.run(cli_args(str(tmp_path)) + ["--config.loss.temperature=-1"], env=env(1), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: invalid configuration") and "loss.temperature=-1" in r.stderr
