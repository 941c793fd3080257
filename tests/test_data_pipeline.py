"""The training pipeline: epoch order, process slices, worker-count and process-count invariance, resume,
bad files, evaluation batches and device prefetch, with the crops cut on the host and (data.crops_on=device) the
images and their crop boxes sent instead."""
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from dcv2_jax import augment, config as config_lib, sharding
from dcv2_jax.conventions import BANK_PASS_EPOCH
from dcv2_jax.data import Pipeline, device_prefetch, eval_batches, transforms

CROPS = ((24, 2, 0.14, 1.0), (12, 3, 0.05, 0.14))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(**data):
  c = config_lib.base_config()
  c.data.source, c.data.image_size_digits, c.data.num_workers, c.data.crops = "digits", 16, 0, CROPS
  c.batch_size, c.num_epochs, c.seed = 100, 3, 7
  for k, v in data.items():
    if k in ("batch_size", "num_epochs", "seed", "where"):
      if k == "where":
        c.augment.where = v
      else:
        setattr(c, k, v)
    else:
      setattr(c.data, k, v)
  return c


def jpeg_folder(root, n, seed=0):
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "c0"), exist_ok=True)
  os.makedirs(os.path.join(root, "c1"), exist_ok=True)
  for i in range(n):
    img = rng.integers(0, 255, (int(rng.integers(30, 50)), int(rng.integers(30, 50)), 3), dtype=np.uint8)
    Image.fromarray(img).save(os.path.join(root, f"c{i % 2}", f"{i:03d}.jpg"), quality=85)
  return str(root)


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for key in x:          # index, label, and crops (host crops) or image, image_size, boxes (device crops)
      for cx, cy in zip(*((v if isinstance(v, list) else [v]) for v in (x[key], y[key])), strict=True):
        np.testing.assert_array_equal(cx, cy)


def join_halves(a, b):
  """Two processes' halves of a batch, concatenated row-wise key by key."""
  return {k: [np.concatenate(pair) for pair in zip(a[k], b[k])] if isinstance(a[k], list) else np.concatenate([a[k], b[k]])
          for k in a}


def test_epoch_covers_dataset_once_minus_drop_last():
  p = Pipeline(make_config(), process_index=0, process_count=1)
  assert (p.num_examples, p.global_batch, p.local_batch, p.steps_per_epoch) == (1438, 100, 100, 14)
  assert p.num_classes == 10
  batches = list(p.iterate(0))
  assert len(batches) == 14
  b = batches[0]
  assert [x.shape for x in b["crops"]] == [(100, 2, 24, 24, 3), (100, 3, 12, 12, 3)]
  assert b["crops"][0].dtype == np.uint8 and b["index"].dtype == np.int32 and b["label"].dtype == np.int32
  index = np.concatenate([x["index"] for x in batches])
  assert len(set(index.tolist())) == 1400 and index.min() >= 0 and index.max() < 1438  # 38 dropped
  assert p._spare is not None  # the finished epoch left its grain iterator (and workers) for the next
  epoch1 = np.concatenate([x["index"] for x in p.iterate(1)])
  assert not np.array_equal(index, epoch1)  # a fresh permutation per epoch
  # crops are the per-sample transform of (seed, epoch, index): recompute one independently
  i, row = int(b["index"][5]), 5
  want = transforms.multi_crop(p.source[i]["image"], transforms.sample_rng(7, 0, i), p.crops)
  for got, w in zip(b["crops"], want):
    np.testing.assert_array_equal(got[row], w)
  assert b["label"][row] == p.source[i]["label"]


def test_an_epoch_past_num_epochs_is_full():
  """The last epoch's grain iterator ends at num_epochs; asking for one more epoch (a run extended with a
  larger num_epochs, or a benchmark) must start a fresh iterator, not hand out the exhausted one."""
  p = Pipeline(make_config(batch_size=400, num_epochs=1), 0, 1)
  assert len(list(p.iterate(0))) == 3
  assert p._spare is None                       # exhausted: closed, not kept
  extra = list(p.iterate(1))
  assert len(extra) == 3 and len(set(np.concatenate([b["index"] for b in extra]).tolist())) == 1200


@pytest.mark.parametrize("crops_on", ["host", "device"])
def test_two_processes_equal_one_and_slices_are_disjoint(crops_on):
  """Process p reads rows [p*B/2, (p+1)*B/2) of every global batch: concatenated, the single-process run."""
  cfg = make_config(num_epochs=1, crops=((16, 1, 0.14, 1.0), (8, 2, 0.05, 0.14)), batch_size=200, crops_on=crops_on)
  one = list(Pipeline(cfg, 0, 1).iterate(0))
  halves = [list(Pipeline(cfg, p, 2).iterate(0)) for p in (0, 1)]
  assert len(one) == len(halves[0]) == len(halves[1]) == 7
  assert_batches_equal(one, [join_halves(a, b) for a, b in zip(*halves)])
  i0 = set(np.concatenate([b["index"] for b in halves[0]]).tolist())
  i1 = set(np.concatenate([b["index"] for b in halves[1]]).tolist())
  assert not i0 & i1 and len(i0) == len(i1) == 700


@pytest.mark.parametrize("crops_on", ["host", "device"])
def test_resume_mid_epoch_gives_the_same_next_batches(crops_on):
  """Where a run is, is its step alone: a new Pipeline started at (epoch, step) continues the stream."""
  cfg = make_config(crops_on=crops_on)
  p = Pipeline(cfg, 0, 1)
  it = p.iterate(1)
  first = [next(it) for _ in range(5)]
  expected = [next(it) for _ in range(2)]
  it2 = Pipeline(cfg, 0, 1).iterate(1, 5)
  assert_batches_equal([next(it2) for _ in range(2)], expected)
  assert len(first) == 5 and len(it) == 14 - 7
  rest = list(it)
  assert len(rest) == 14 - 7
  # a second iterate() closes an unfinished first one: using it then is an error, not a silent short epoch
  old = p.iterate(2)
  next(old)
  p.iterate(2)
  with pytest.raises(RuntimeError, match="closed"):
    next(old)


def test_host_mode_applies_colour_ops_on_cpu():
  cfg_dev, cfg_host = make_config(num_epochs=1), make_config(num_epochs=1, where="host")
  dev = next(Pipeline(cfg_dev, 0, 1).iterate(0))
  host = next(Pipeline(cfg_host, 0, 1).iterate(0))
  np.testing.assert_array_equal(dev["index"], host["index"])
  # host crops = host_augment(the same geometric crops, uniforms drawn next from the sample's generator)
  row = 3
  i = int(dev["index"][row])
  rng = transforms.sample_rng(7, 0, i)
  crops = transforms.multi_crop(make_source_image(cfg_dev, i), rng, CROPS)
  u = rng.random((5, augment.NUM_UNIFORMS))
  for g, sl in enumerate(augment.group_slices(CROPS)):
    np.testing.assert_array_equal(dev["crops"][g][row], crops[g])
    np.testing.assert_array_equal(host["crops"][g][row], augment.host_augment(crops[g], u[sl], cfg_host.augment))
  assert (host["crops"][0] != dev["crops"][0]).mean() > 0.5


def test_device_crops_send_the_image_and_the_boxes_the_host_crops_are_cut_at(tmp_path):
  """data.crops_on=device: each sample is its decoded image on the canvas (true size beside it) and the boxes the
  host path would cut its crops at, drawn from the same (seed, epoch, index) stream; an image larger than the
  canvas is downscaled to fit and its boxes scale with it; the memory bank's pass draws its own boxes."""
  root = jpeg_folder(tmp_path, 12)
  Image.fromarray(np.full((90, 60, 3), 200, np.uint8)).save(os.path.join(root, "c0", "large.png"))
  crops = ((24, 2, 0.14, 1.0), (12, 3, 0.05, 0.14))
  cfg = make_config(source="image_folder", path=root, batch_size=13, crops=crops, crops_on="device", canvas_size=64)
  p = Pipeline(cfg, 0, 1)
  (batch,) = list(p.iterate(0))
  assert "crops" not in batch and batch["image"].shape == (13, 64, 64, 3) and batch["boxes"].shape == (13, 5, 4)
  (host,) = list(Pipeline(make_config(source="image_folder", path=root, batch_size=13, crops=crops), 0, 1).iterate(0))
  np.testing.assert_array_equal(host["index"], batch["index"])
  for row, i in enumerate(batch["index"]):
    image = p.source[int(i)]["image"]
    h, w = image.shape[:2]
    boxes = transforms.crop_boxes(transforms.sample_rng(7, 0, int(i)), h, w, crops)
    if max(h, w) <= 64:
      np.testing.assert_array_equal(batch["image"][row, :h, :w], image)
      assert (batch["image"][row, h:] == 0).all() and (batch["image"][row, :, w:] == 0).all()
      np.testing.assert_array_equal(batch["boxes"][row], boxes)
      np.testing.assert_array_equal(batch["image_size"][row], (h, w))
      # ... the very boxes the host crops of this sample were cut at
      np.testing.assert_array_equal(host["crops"][0][row, 1], transforms.resized_crop(
          Image.fromarray(image), tuple(boxes[1].astype(int)), 24))
    else:                                           # the 90 x 60 image: to 64 x 43, boxes x 64/90 and 43/60
      np.testing.assert_array_equal(batch["image_size"][row], (64, 43))
      np.testing.assert_allclose(batch["boxes"][row], boxes * np.asarray([64 / 90, 43 / 60] * 2), rtol=1e-6)
  assert p.downscaled == 1
  (bank,) = list(p.bank_pass())
  row = 0
  h, w = p.source[int(bank["index"][row])]["image"].shape[:2]
  np.testing.assert_array_equal(bank["index"], batch["index"])     # epoch 0's samples, their own boxes
  np.testing.assert_array_equal(bank["boxes"][row], transforms.crop_boxes(
      transforms.sample_rng(7, BANK_PASS_EPOCH, int(bank["index"][row])), h, w, crops))
  assert not np.array_equal(bank["boxes"], batch["boxes"])


def make_source_image(cfg, i):
  from dcv2_jax.data import make_source
  return make_source(cfg.data)[i]["image"]


def test_bad_files_are_skipped_and_marked(tmp_path, caplog):
  root = jpeg_folder(tmp_path, 10)
  good = open(os.path.join(root, "c0", "000.jpg"), "rb").read()
  with open(os.path.join(root, "c1", "bad_garbage.jpg"), "wb") as f:
    f.write(b"this is not a jpeg at all")
  with open(os.path.join(root, "c1", "bad_truncated.jpg"), "wb") as f:
    f.write(good[: len(good) // 2])
  cfg = make_config(source="image_folder", path=root, batch_size=12, crops=((16, 2, 0.14, 1.0),))
  p = Pipeline(cfg, 0, 1)
  bad = {i for i in range(len(p.source)) if os.path.basename(p.source.path(i)).startswith("bad_")}
  assert len(bad) == 2 and p.num_examples == 12
  with caplog.at_level(logging.WARNING):
    (batch,) = list(p.iterate(0))
  assert not bad & set(batch["index"].tolist())
  marked = batch["index"] == -1
  assert marked.sum() == 2 and (batch["label"][marked] == -1).all()
  assert (batch["crops"][0][marked] == 0).all() and (batch["crops"][0][~marked] != 0).any()
  assert "bad_garbage.jpg" in caplog.text and "bad_truncated.jpg" in caplog.text
  assert sorted(p.bad_samples) == sorted(bad) and all("Error" in why for why in p.bad_samples.values())
  caplog.clear()
  with caplog.at_level(logging.WARNING):          # the next epoch skips them again, without a word
    (batch,) = list(p.iterate(1))
  assert (batch["index"] == -1).sum() == 2 and "bad_" not in caplog.text
  ev = list(eval_batches(cfg.data, "train", 8, 16, 0, 1))
  valid = np.concatenate([b["valid"] for b in ev])
  assert valid.sum() == 10 and len(valid) == 16


@pytest.mark.parametrize("crops_on", ["host", "device"])
def test_worker_processes_give_identical_batches(tmp_path, crops_on):
  """1 and 2 grain worker processes (and none) produce the same batches, across an epoch boundary, with a
  corrupt file in the data (no crash, no hang in a worker)."""
  root = jpeg_folder(tmp_path, 23)
  with open(os.path.join(root, "c1", "broken.jpg"), "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 broken")
  runs = {}
  for workers in (0, 1, 2):
    cfg = make_config(source="image_folder", path=root, batch_size=8, num_epochs=2, num_workers=workers,
                      crops_on=crops_on)
    with Pipeline(cfg, 0, 1) as p:
      runs[workers] = list(p.iterate(0)) + list(p.iterate(1))
  assert len(runs[0]) == 6
  assert_batches_equal(runs[0], runs[1])
  assert_batches_equal(runs[0], runs[2])
  assert sum((b["index"] == -1).sum() for b in runs[0]) in (1, 2)  # broken.jpg once per epoch unless dropped


# A process that reads an image folder (argv[1]) with grain workers, then ends as argv[2] says: "end" (two
# epochs and an evaluation pass to their ends), "sigterm" (SIGTERM mid-epoch, handled like the trainer's
# preemption: exit 143 through the pipeline's close, an evaluation loop left unfinished and unclosed), "hold"
# (one batch, then waits to be killed).
WORKERS_SCRIPT = r"""
import os, signal, sys, time
from dcv2_jax import config as config_lib
from dcv2_jax.data import Pipeline, eval_batches

if __name__ == "__main__":
  root, ending = sys.argv[1:]
  cfg = config_lib.base_config()
  cfg.data.source, cfg.data.path, cfg.data.crops = "image_folder", root, ((16, 2, 0.4, 1.0),)
  cfg.data.num_workers, cfg.data.prefetch, cfg.batch_size, cfg.num_epochs = 2, 4, 8, 2
  if ending == "end":
    with Pipeline(cfg, 0, 1) as p:
      steps = sum(1 for epoch in (0, 1) for _ in p.iterate(epoch))
    print(steps, sum(1 for _ in eval_batches(cfg.data, "train", 8, 16, 0, 1)), flush=True)
  elif ending == "sigterm":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    unfinished = eval_batches(cfg.data, "train", 4, 16, 0, 1)
    next(unfinished)
    with Pipeline(cfg, 0, 1) as p:
      for step, _ in enumerate(p.iterate(0)):
        print(step, flush=True)
        if step == 1:
          time.sleep(1)     # the workers reach the end of these short streams: their last batches wait unread
          os.kill(os.getpid(), signal.SIGTERM)
  else:
    next(Pipeline(cfg, 0, 1).iterate(0))
    print("ready", flush=True)
    time.sleep(600)
"""


def start_workers_script(root, ending, **kwargs):
  return subprocess.Popen([sys.executable, "-c", WORKERS_SCRIPT, root, ending], env=dict(os.environ, PYTHONPATH=REPO),
                          text=True, **kwargs)


@pytest.mark.parametrize("ending,returncode,printed", [("end", 0, "10 5"), ("sigterm", 143, "0\n1")])
def test_grain_workers_leave_no_shared_memory_behind(tmp_path, ending, returncode, printed):
  """Batches come from the workers through POSIX shared memory; however the process ends (its streams run out,
  or SIGTERM mid-epoch with prefetched batches unread and an iterator left open), it unlinks every segment
  before exit, so Python's resource tracker finds none to clean up (it warns of them on stderr)."""
  root = jpeg_folder(tmp_path, 40)
  proc = start_workers_script(root, ending, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == returncode, err[-3000:]
  assert out.strip() == printed
  assert "leaked shared_memory" not in err, err[-3000:]


def child_processes(pid: int) -> dict[int, str]:
  """The processes whose parent is `pid`: process id -> start time (what tells a reused process id apart)."""
  children = {}
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):   # not a process, or one that has just ended
      continue
    if int(fields[1]) == pid:
      children[int(entry)] = fields[19]
  return children


def running(pid: int, start_time: str) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return False
  return fields[19] == start_time and fields[0] != "Z"   # a zombie holds no memory, only its exit status


def test_grain_workers_end_when_their_process_is_killed(tmp_path):
  """A process killed by SIGKILL (the kernel's out-of-memory killer) takes its grain workers with it; they do
  not live on as orphans holding memory. Its resource tracker, which waited for them, ends as well."""
  proc = start_workers_script(jpeg_folder(tmp_path, 40), "hold", stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
  children = {}
  try:
    assert proc.stdout.readline().strip() == "ready"
    children = child_processes(proc.pid)
    workers = [pid for pid in children if "spawn_main" in open(f"/proc/{pid}/cmdline").read()]
    assert len(workers) == 2 and len(children) == 3        # and the resource tracker
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while any(running(pid, start) for pid, start in children.items()) and time.time() < deadline:
      time.sleep(0.1)
    assert not [pid for pid, start in children.items() if running(pid, start)]
  finally:
    proc.kill()
    for pid, start in children.items():   # a failed run must not leave orphans behind on the test machine
      if running(pid, start):
        os.kill(pid, signal.SIGKILL)


def test_eval_batches_contiguous_shares_padded():
  cfg = make_config()
  per_process = [list(eval_batches(cfg.data, "validation", 32, 20, p, 3)) for p in range(3)]
  assert len({len(b) for b in per_process}) == 1 and len(per_process[0]) == 4  # ceil(ceil(359/3)/32)
  seen = []
  for p, batches in enumerate(per_process):
    for b in batches:
      assert b["image"].shape == (32, 20, 20, 3) and b["image"].dtype == np.uint8
      assert b["valid"].dtype == bool and b["label"].dtype == np.int32 and b["index"].dtype == np.int32
      assert (b["index"][~b["valid"]] == -1).all() and (b["image"][~b["valid"]] == 0).all()
    idx = np.concatenate([b["index"][b["valid"]] for b in batches])
    np.testing.assert_array_equal(idx, np.arange(p * 120, min((p + 1) * 120, 359)))  # contiguous share
    seen.extend(idx.tolist())
  assert sorted(seen) == list(range(359))


def test_device_prefetch_makes_global_arrays():
  mesh = sharding.make_mesh()
  cfg = make_config(batch_size=16, num_epochs=1)
  p = Pipeline(cfg, 0, 1)
  local = list(p.iterate(0))[:3]
  it = p.iterate(0)
  pre = device_prefetch(it, mesh, size=2)
  for want in local:
    got = next(pre)
    assert isinstance(got["index"], jax.Array) and got["index"].sharding.spec[0] == sharding.DATA_AXIS
    assert got["crops"][1].shape == (16, 3, 12, 12, 3)
    np.testing.assert_array_equal(np.asarray(got["crops"][0]), want["crops"][0])
    np.testing.assert_array_equal(np.asarray(got["index"]), want["index"])
  pre.close()

  def failing():
    yield local[0]
    raise RuntimeError("source broke")

  pre = device_prefetch(failing(), mesh)
  next(pre)
  with pytest.raises(RuntimeError, match="source broke"):
    next(pre)


def test_config_errors():
  """The data settings a pipeline cannot work with are refused by config.validate, before it is built."""
  def problems(cfg, num_examples=1438, processes=1):
    with pytest.raises(config_lib.ConfigError) as e:
      config_lib.validate(cfg, num_examples, num_examples // cfg.batch_size, num_devices=4, num_processes=processes)
    return str(e.value)

  assert "fewer than one global batch" in problems(make_config(batch_size=4096))
  assert "large crops first" in problems(make_config(crops=((12, 2, 0.1, 1.0), (24, 2, 0.1, 1.0))))
  assert "divisible by the 3 processes" in problems(make_config(batch_size=100), processes=3)
  assert "augment.where='gpu'" in problems(make_config(where="gpu"))
  c = make_config(batch_size=0)
  c.per_device_batch_size = 4
  resolved, _ = config_lib.resolve(c, jax.device_count())
  assert Pipeline(resolved, 0, 1).global_batch == 4 * jax.device_count()
