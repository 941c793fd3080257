"""The trainer end to end on the digits demo data, in one process: outputs, resume after SIGKILL and SIGTERM,
on fewer devices, from a damaged checkpoint; undecodable files; the messages for bad settings.
(test_trainer_multihost.py: several processes and broken machines.)"""
import json
import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from dcv2_jax import config as config_lib
from dcv2_jax.trainer import DeviceOutOfMemory, NonFiniteLoss, train_and_evaluate
from run_helpers import assert_same_as_reference, cli_args, env, final_params, logged_step, small_config


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
  assert [int(t.max()) < k for t, k in zip(table, (10, 6, 4))] == [True] * 3    # never a padded cluster
  # The memory bank's pass reads epoch 0's samples: every sample epoch 0 trains on has a target.
  from dcv2_jax.data import Pipeline
  order = Pipeline(config_lib.resolve(small_config(), 8)[0], 0, 1).loader.epoch_order(0)[:22 * 64]
  first = np.load(os.path.join(reference_run, "assignments", "epoch_0000.npz"))["assignments"]
  assert np.all(first[:, order] >= 0)
  from dcv2_jax import export
  _, sd = export.export(reference_run, "swav", os.path.join(reference_run, "swav.safetensors"))
  assert [sd[f"module.prototypes.prototypes{h}.weight"].shape for h in range(3)] == [(10, 16), (6, 16), (4, 16)]
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
  from dcv2_jax import train_step

  def out_of_memory(*args):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 68719476736 "
                                     "bytes.")

  monkeypatch.setattr(train_step, "bank_init_step", out_of_memory)
  with pytest.raises(DeviceOutOfMemory, match=r"8 samples \(2x16 crops each\) per device: global batch 64 on 8") as e:
    train_and_evaluate(small_config(), str(tmp_path / "oom"))
  assert "--config.per_device_batch_size=4" in str(e.value) and "68719476736 bytes" in str(e.value)
  assert "python -m dcv2_jax.bench compile --config <this config> --gpu a100-80gb,h100,h200 --devices 8 --max_batch" \
      in str(e.value)       # the planner, which finds the largest batch that fits without a GPU

  monkeypatch.setattr(train_step, "bank_init_step", lambda *a: (_ for _ in ()).throw(KeyError("other")))
  with pytest.raises(KeyError, match="other"):
    train_and_evaluate(small_config(), str(tmp_path / "other"))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  c = small_config(**{"optim.lr": 1e30, "optim.warmup_start_lr": 1e30, "checkpoint_every_steps": 1})
  with pytest.raises(NonFiniteLoss, match=r"at step \d+"):
    train_and_evaluate(c, str(tmp_path))
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  for s in steps:    # every checkpoint that was written holds finite weights
    leaves, _, _ = final_params(str(tmp_path / "checkpoints" / str(s)))
    assert all(np.all(np.isfinite(x)) for x in leaves)


def test_partly_written_checkpoint_is_never_loaded(reference_run, tmp_path):
  from dcv2_jax.run.checkpoint import Checkpoints
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


def test_small_data_run_cifar_stem_live_knn_cluster_pictures_export_and_inspect(tmp_path):
  """A short run with the CIFAR stem, the live kNN curve and the cluster pictures: knn_top1 in metrics.jsonl,
  clusters/epoch_XXXX.png of the members nearest each centroid, evaluation at the training size written to
  config.json; the weights export (swav layout) and load back with the CIFAR stem; inspect draws the same."""
  from dcv2_jax import export, inspect, load
  workdir = str(tmp_path / "small")
  train_and_evaluate(small_config(**{"model.stem": "cifar", "num_epochs": 1, "eval_every_epochs": 1,
                                     "log_cluster_images": 4, "data.eval_resize": "auto"}), workdir)
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  knn = [r for r in records if "knn_top1" in r]
  assert [r["epoch"] for r in knn] == [0] and 0.3 < knn[0]["knn_top1"] <= 1.0          # chance is 0.1
  saved = json.load(open(os.path.join(workdir, "config.json")))["data"]
  assert (saved["eval_image_size"], saved["eval_resize"]) == (16, "whole")             # auto, 16 px crops: whole image
  with np.load(os.path.join(workdir, "assignments", "epoch_0000.npz")) as f:
    table, clusters, nearest = f["assignments"], f["clusters"], f["nearest"]
  assert nearest.shape == (4, 8) and (nearest >= 0).all()
  assert all((table[0][nearest[r]] == clusters[r]).all() for r in range(4))          # members of their cluster
  sizes = np.bincount(table[0][table[0] >= 0], minlength=10)
  assert sorted(sizes[clusters].tolist(), reverse=True) == sorted(sizes, reverse=True)[:4]   # the largest
  from PIL import Image
  picture = np.asarray(Image.open(os.path.join(workdir, "clusters", "epoch_0000.png")))
  assert picture.shape == (4 * 50 + 2, 8 * 50 + 2, 3) and picture.std() > 10
  out = str(tmp_path / "small.safetensors")
  export.export(workdir, "swav", out)
  apply_dir, variables_dir = load.load_trunk(workdir)
  apply_file, variables_file = load.load_trunk(out)
  x = np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(apply_file(variables_file, x)), np.asarray(apply_dir(variables_dir, x)),
                             rtol=1e-5, atol=1e-5)
  from safetensors.numpy import load_file
  assert load.trunk_from_state_dict(load_file(out))[0].stem == "cifar"
  written = inspect.main(["--workdir", workdir, "--clusters", "4"])
  inspected = np.asarray(Image.open(written["clusters"]))
  np.testing.assert_array_equal(inspected, picture)                    # the same grid from the saved table
  assert os.path.getsize(written["curves"]) > 10000


def test_a_missing_eval_split_stops_the_run_before_training(tmp_path, monkeypatch):
  from PIL import Image
  from dcv2_jax import trainer
  root = tmp_path / "images" / "train" / "c0"
  root.mkdir(parents=True)
  for i in range(70):
    Image.fromarray(np.full((20, 20, 3), i, np.uint8)).save(root / f"{i}.png")
  monkeypatch.setattr(trainer, "jit_epoch_steps", lambda *a: pytest.fail("compiled although evaluation cannot run"))
  config = small_config(**{"data.source": "image_folder", "data.path": str(tmp_path / "images"),
                           "data.eval_split": "test", "eval_at_end": True, "loss.num_clusters": (5, 5, 5)})
  with pytest.raises(config_lib.ConfigError, match=r"data.eval_split='test' cannot be read: .*no sub-folder 'test'"):
    train_and_evaluate(config, str(tmp_path / "run"))
