"""kNN, linear probe, feature extraction on the 8-device mesh, evaluate_trunk and the CLI.

load_trunk and eval_batches belong to other modules: these tests use stand-ins (a tiny flax network,
generators of dict batches); the digits end-to-end test at the bottom uses the real data pipeline when
it is there.
"""
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from dcv2_jax import evaluate
from dcv2_jax import evaluation as ev
from dcv2_jax import sharding as shd
from dcv2_jax.config import base_config

NORM = dict(mean=(0.485, 0.456, 0.406), std=(0.228, 0.224, 0.225))


def _knn_reference(train, train_labels, test, num_classes, k, temperature):
  """Straightforward float64 weighted kNN."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  test = test / np.linalg.norm(test, axis=1, keepdims=True)
  sim = test.astype(np.float64) @ train.astype(np.float64).T
  idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
  votes = np.zeros((len(test), num_classes))
  for i in range(len(test)):
    np.add.at(votes[i], train_labels[idx[i]], np.exp(sim[i, idx[i]] / temperature))
  return votes.argmax(axis=1)


def _blobs(rng, n, num_classes, dim, spread):
  centers = rng.normal(size=(num_classes, dim)) * 5
  labels = rng.integers(0, num_classes, n)
  return (centers[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32), labels


def test_knn_matches_float64_reference():
  rng = np.random.default_rng(0)
  train = rng.normal(size=(500, 16)).astype(np.float32)
  labels = rng.integers(0, 7, 500)
  test = rng.normal(size=(70, 16)).astype(np.float32)
  want = _knn_reference(train, labels, test, 7, k=20, temperature=0.07)
  # Chunks that divide neither side: test padding and the masked train padding + running top-k merge.
  got = ev.knn_classify(train, labels, test, 7, k=20, temperature=0.07, chunk=32, train_chunk=96)
  np.testing.assert_array_equal(got, want)
  one = ev.knn_classify(train, labels, test, 7, k=20, temperature=0.07)
  np.testing.assert_array_equal(one, want)
  # Train rows sharded over the 8 devices (500 rows -> 8 x 2 chunks of 32, the last shards padding).
  mesh = shd.make_mesh()
  sharded = ev.knn_classify(train, labels, test, 7, k=20, temperature=0.07, chunk=32, train_chunk=32,
                            mesh=mesh)
  np.testing.assert_array_equal(sharded, want)
  # k above the chunk size, and whole device shards of padding (20 rows over 8 devices x 3).
  for m in (None, mesh):
    np.testing.assert_array_equal(ev.knn_classify(train[:20], labels[:20], test, 7, k=20, temperature=0.1,
                                                  train_chunk=2, mesh=m),
                                  _knn_reference(train[:20], labels[:20], test, 7, 20, 0.1))
  # k larger than the train set is clamped; temperature is honoured.
  np.testing.assert_array_equal(ev.knn_classify(train[:10], labels[:10], test, 7, k=50, temperature=1.0),
                                _knn_reference(train[:10], labels[:10], test, 7, 10, 1.0))


def test_knn_separable_and_random_labels():
  rng = np.random.default_rng(1)
  x, y = _blobs(rng, 1200, 10, 32, 1.0)
  assert ev.knn_accuracy(x[:1000], y[:1000], x[1000:], y[1000:], 10) > 0.99
  r = rng.integers(0, 10, 1200)
  assert ev.knn_accuracy(x[:1000], r[:1000], x[1000:], r[1000:], 10) < 0.2   # chance is 0.1


def test_linear_probe_separable_and_random_labels():
  rng = np.random.default_rng(2)
  x, y = _blobs(rng, 1200, 10, 32, 3.0)
  p = ev.fast_protocol()
  res = ev.linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], 10, p)
  assert res["accuracy"] > 0.98 and res["top5"] == 1.0 and res["final_loss"] < 0.2
  r = rng.integers(0, 10, 1200)
  res = ev.linear_probe(x[:1000], r[:1000], x[1000:], r[1000:], 10, p)
  assert res["accuracy"] < 0.2
  # The ImageNet protocol runs as well (raw features, lr 0.3); few epochs to stay fast.
  q = ev.linear_protocol()
  assert (q.epochs, q.lr, q.weight_decay, q.batch_size, q.standardize) == (100, 0.3, 1e-6, 256, False)
  q.epochs = 5
  res = ev.linear_probe(x[:1000] / 10, y[:1000], x[1000:] / 10, y[1000:], 10, q)
  assert res["accuracy"] > 0.95 and res["steps"] == 5 * 3


class TinyNet(nn.Module):
  """Stand-in trunk: conv + BN (eval mode) + global average pool -> [b, 8]."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), padding=1)(x)
    x = nn.BatchNorm(use_running_average=True)(x)
    return jnp.mean(nn.relu(x), axis=(1, 2))


def _tiny_trunk(size=8, seed=0):
  net = TinyNet()
  variables = net.init(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 3)))
  return (lambda v, x: net.apply(v, x)), variables


def test_extract_features_sharded_matches_unsharded_and_drops_padding():
  apply_fn, variables = _tiny_trunk()
  rng = np.random.default_rng(3)
  sizes = [16, 16, 12]                                        # 12: not a multiple of the 8 devices
  batches, want_rows = [], []
  start = 0
  for b in sizes:
    valid = np.ones(b, bool)
    if b == 12:
      valid[9:] = False                                       # a padded tail, as eval_batches makes
    batches.append(dict(image=rng.integers(0, 256, (b, 8, 8, 3), dtype=np.uint8),
                        label=rng.integers(0, 5, b).astype(np.int32),
                        index=np.arange(start, start + b, dtype=np.int32), valid=valid))
    start += b
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  mesh = shd.make_mesh()
  assert mesh.devices.size == 8
  feats, labels, index = ev.extract_features(apply_fn, variables, iter(batches), mesh, mean=mean, std=std,
                                             progress=False)
  images = np.concatenate([b["image"][b["valid"]] for b in batches])
  x = (images.astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std)
  dev = jax.devices()[0]
  want = np.asarray(jax.jit(apply_fn)(jax.device_put(variables, dev), jax.device_put(x, dev)))
  assert feats.shape == (16 + 16 + 9, 8) and feats.dtype == np.float32
  np.testing.assert_allclose(feats, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(labels, np.concatenate([b["label"][b["valid"]] for b in batches]))
  np.testing.assert_array_equal(index, np.concatenate([b["index"][b["valid"]] for b in batches]))


def _digits_split(split):
  d = load_digits()
  perm = np.random.default_rng(0).permutation(len(d.target))
  rows = perm[:1437] if split == "train" else perm[1437:]
  return d.images[rows], d.target[rows], rows


def _fake_eval_batches(data_cfg, split, batch_size, image_size, process_index=None, process_count=None, **view):
  """Stand-in for dcv2_jax.data.eval_batches: digits as uint8 RGB, padded last batch."""
  images, labels, rows = _digits_split(split)
  images = np.repeat((images * 255 / 16).astype(np.uint8)[..., None], 3, axis=-1)
  reps = image_size // 8
  images = images.repeat(reps, axis=1).repeat(reps, axis=2)
  for s in range(0, len(labels), batch_size):
    n = len(labels[s:s + batch_size])
    pad = batch_size - n
    yield dict(image=np.pad(images[s:s + n], ((0, pad), (0, 0), (0, 0), (0, 0))),
               label=np.pad(labels[s:s + n], (0, pad)).astype(np.int32),
               index=np.pad(rows[s:s + n], (0, pad)).astype(np.int32),
               valid=np.arange(batch_size) < n)


def _digits_cfg():
  cfg = base_config()
  cfg.data.source, cfg.data.split, cfg.data.eval_split = "digits", "train", "test"
  cfg.data.image_size_digits = 16
  cfg.data.crops = ((16, 2, 0.5, 1.0),)                      # so evaluation sees 16 px images
  cfg.data.num_workers = 0                                   # no grain worker processes in tests
  cfg.loss.num_clusters = (10, 10)
  return cfg


def test_evaluate_trunk_with_stand_ins():
  apply_fn, variables = _tiny_trunk(16)
  cfg = _digits_cfg()
  res, arrays = ev.evaluate_trunk(apply_fn, variables, cfg.data, protocol=ev.fast_protocol(),
                                  batch_size=256, batches_fn=_fake_eval_batches, return_features=True,
                                  progress=False, **NORM)
  assert res["num_train"] == 1437 and res["num_test"] == 360 and res["feature_dim"] == 8
  assert res["knn_top1"] > 0.5 and res["linear_top1"] > 0.3   # random 8-d features; chance is 0.1
  assert arrays["train"][0].shape == (1437, 8)
  json.dumps(res)
  cfg.data.eval_split = ""
  assert "skipped" in ev.evaluate_trunk(apply_fn, variables, cfg.data, batches_fn=_fake_eval_batches, **NORM)


def test_cli_workdir(tmp_path, monkeypatch, capsys):
  import dcv2_jax.data
  import dcv2_jax.load
  apply_fn, variables = _tiny_trunk(16)
  monkeypatch.setattr(dcv2_jax.load, "load_trunk", lambda path: (apply_fn, variables))
  monkeypatch.setattr(dcv2_jax.data, "eval_batches", _fake_eval_batches)
  wd = tmp_path / "wd"
  (wd / "assignments").mkdir(parents=True)
  (wd / "config.json").write_text(_digits_cfg().to_json())
  d = load_digits()
  n = len(d.target)
  table = np.stack([d.target, np.random.default_rng(0).integers(0, 10, n)]).astype(np.int32)
  table[:, :7] = -100
  np.savez(wd / "assignments" / "epoch_0001.npz", assignments=np.zeros_like(table), index=np.arange(n))
  np.savez(wd / "assignments" / "epoch_0002.npz", assignments=table, index=np.arange(n))

  res = evaluate.main(["--workdir", str(wd), "--no_linear", "--batch_size", "128"])
  assert res["protocol"] == "fast" and "linear_top1" not in res and res["knn_top1"] > 0.5
  cl = res["clusters"]
  assert cl["file"] == "epoch_0002.npz" and cl["labelled"] == 1437
  # Head 0 is the label itself (on the train split); head 1 is random.
  assert cl["nmi_labels"][0] == pytest.approx(1.0) and cl["purity_labels"][0] == pytest.approx(1.0)
  assert cl["nmi_labels"][1] < 0.1
  lines = (wd / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[-1])["eval"]["knn_top1"] == res["knn_top1"]
  assert '"eval"' in capsys.readouterr().out
  with np.load(wd / "assignments" / "latest_with_labels.npz") as f:
    train_rows = _digits_split("train")[2]
    want = np.full(n, -1)
    want[train_rows] = d.target[train_rows]
    np.testing.assert_array_equal(f["labels"], want)
    np.testing.assert_array_equal(f["assignments"], table)


def test_evaluate_trunk_digits_end_to_end():
  """The real data pipeline's digits source + a random-init tiny network."""
  apply_fn, variables = _tiny_trunk(16)
  cfg = _digits_cfg()
  res = ev.evaluate_trunk(apply_fn, variables, cfg.data, protocol=ev.fast_protocol(), batch_size=256,
                          image_size=16, progress=False, **NORM)
  assert res["num_train"] + res["num_test"] == 1797 and res["num_test"] > 0
  assert res["knn_top1"] > 0.3


def test_bad_input_to_the_commands_is_one_line(tmp_path):
  """evaluate, linear_eval and export: a wrong path or a file that holds no weights ends with one line
  naming the problem and a non-zero exit, in process (SystemExit) and as a command (no traceback)."""
  import subprocess
  import sys
  from dcv2_jax import export, linear_eval
  junk = tmp_path / "junk.safetensors"          # safetensors: the same check with torch installed or not
  junk.write_bytes(b"not a state dict")
  (tmp_path / "empty").mkdir()
  cases = [(evaluate.main, ["--weights", str(junk)], "is not a weights file this tool reads"),
           (evaluate.main, ["--workdir", str(tmp_path / "missing")], "does not exist"),
           (evaluate.main, ["--workdir", str(tmp_path / "empty")], "has no config.json"),
           (evaluate.main, [], "give --workdir"),
           (linear_eval.main, ["--workdir", str(tmp_path / "missing")], "does not exist"),
           (export.main, ["--workdir", str(tmp_path / "empty"), "--format", "swav", "--out", str(tmp_path / "x.pth")],
            "not a dcv2-jax workdir")]
  for main, argv, part in cases:
    with pytest.raises(SystemExit) as e:
      main(argv)
    assert str(e.value).startswith("error: ") and part in str(e.value) and "\n" not in str(e.value)
  r = subprocess.run([sys.executable, "-m", "dcv2_jax.evaluate", "--weights", str(junk)], capture_output=True,
                     text=True, timeout=300)
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "is not a weights file" in r.stderr


def test_a_torch_file_without_torch_installed_is_one_clear_line(tmp_path, monkeypatch):
  """The GPU image's Python 3.12 line has no CPU torch: a .pth then says what to do, not ModuleNotFoundError."""
  from dcv2_jax import load
  monkeypatch.setitem(sys.modules, "torch", None)          # `import torch` raises ImportError
  path = tmp_path / "weights.pth"
  path.write_bytes(b"whatever")
  with pytest.raises(ValueError, match=r"reading a torch file needs torch .*\.safetensors"):
    load.load_state_dict_file(str(path))
