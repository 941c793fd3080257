"""Evaluation of frozen trunk features: weighted kNN, linear probe, cluster quality, and the CLI.

    python -m dcv2_jax.evaluate --workdir W                 # weights, config and assignments from W
    python -m dcv2_jax.evaluate --weights model.pth --config configs/x.py --protocol imagenet

Features are extracted once per split (eval transform: the data pipeline's resize/centre crop, no
augmentation) and both kNN and the probe run on those pre-extracted pooled features. That differs from
the SwAV linear-eval recipe, which trains the probe on augmented crops (RandomResizedCrop + flip): expect
numbers slightly below the published ones for the same weights. `python -m dcv2_jax.linear_eval` runs that
recipe (hours on ImageNet instead of minutes).

Splits: train features come from `data.split`, test features from `data.eval_split`. The `digits` source
has no official splits; the data pipeline makes a deterministic 80/20 one, so use data.split='train' and
data.eval_split='test' (or 'validation', the same rows) there. Dataset indices are per split, so the
train split's indices are the ones the trainer's assignment tables use.
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import sys
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from dcv2_jax import cluster_metrics
from dcv2_jax import sharding as shd

DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.228, 0.224, 0.225)   # SwAV repo; same as config.augment.std

# linear_probe keyword arguments that a protocol ConfigDict carries.
_PROBE_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "momentum", "nesterov", "standardize", "seed")


# ----------------------------------------------------------------------------------------- protocols

def imagenet_protocol() -> ml_collections.ConfigDict:
  """SwAV-repo linear eval (100 epochs, SGD lr 0.3 cosine, wd 1e-6, batch 256) and DINO-style kNN."""
  p = ml_collections.ConfigDict()
  p.name = "imagenet"
  p.epochs = 100
  p.batch_size = 256
  p.lr = 0.3
  p.weight_decay = 1e-6
  p.momentum = 0.9
  p.nesterov = False
  p.standardize = False          # the published protocol feeds raw pooled features to the Linear layer
  p.seed = 0
  p.knn_k = 20
  p.knn_temperature = 0.07
  p.extract_batch_size = 256     # feature-extraction batch per process (eval_batches' batch_size)
  return p


def fast_protocol() -> ml_collections.ConfigDict:
  """For small data (digits, tests): standardized features, so one LR suits any trunk and width."""
  p = imagenet_protocol()
  p.name = "fast"
  p.epochs = 30
  p.batch_size = 128
  p.lr = 0.1
  p.weight_decay = 1e-4
  p.standardize = True
  return p


def get_protocol(name: str) -> ml_collections.ConfigDict:
  return {"imagenet": imagenet_protocol, "fast": fast_protocol}[name]()


# ----------------------------------------------------------------------------------- feature extraction

def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  pad = n - x.shape[0]
  return x if pad == 0 else np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])


def extract_features(apply_fn: Callable, variables, batches: Iterable[dict], mesh=None, *,
                     mean=DEFAULT_MEAN, std=DEFAULT_STD, total: int | None = None, progress: bool = True):
  """Pooled features of every valid row of `batches`: (features [n, F] float32, labels [n], indices [n]).

  batches: dicts with image uint8 [b, S, S, 3] (this process's rows), and optionally label int [b]
  (default -1), index int [b] (default running count), valid bool [b] (default all True).
  Images become float32 in [0, 1], normalised by mean/std, then go through `apply_fn(variables, x)`
  under jit with the batch split over the mesh's data axis. Every process gets all rows (the outputs
  are replicated), in batch order, process-major within a batch.
  """
  mesh = shd.make_mesh() if mesh is None else mesh
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  # A process feeds rows to its own devices only: pad its rows to a multiple of them.
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)

  def forward(variables, image, label, index, valid):
    x = (image.astype(jnp.float32) / 255.0 - mean) / std
    return apply_fn(variables, x).astype(jnp.float32), label, index, valid

  # Replicated outputs: np.asarray works on every process, also multi-host.
  fwd = jax.jit(forward, out_shardings=shd.replicated(mesh))
  variables = jax.device_put(variables, shd.replicated(mesh))

  if total is None and hasattr(batches, "__len__"):
    total = len(batches)
  bar = None
  if progress and jax.process_index() == 0:
    try:
      from tqdm import tqdm
      bar = tqdm(total=total, desc="features", unit="batch", leave=False, mininterval=5.0)
    except ImportError:  # tqdm is not a declared dependency: fall back to a log line every 100 batches
      bar = None

  feats, labels, indices = [], [], []
  count = 0

  def collect(out):
    f, l, i, v = (np.asarray(a) for a in out)
    feats.append(f[v]), labels.append(l[v]), indices.append(i[v])

  pending, start = None, time.time()
  for step, batch in enumerate(batches):
    image = np.asarray(batch["image"])
    b = image.shape[0]
    label = np.asarray(batch.get("label", np.full(b, -1)), np.int32)
    index = np.asarray(batch.get("index", np.arange(count, count + b)), np.int32)
    valid = np.asarray(batch.get("valid", np.ones(b, bool)), bool)
    count += b
    n = -(-b // local_devices) * local_devices
    local = tuple(_pad_rows(a, n) for a in (image, label, index, valid))  # padding has valid=False
    out = fwd(variables, *shd.local_batch_to_global(local, mesh))
    # Dispatch this batch before fetching the previous one, so the device never waits for the host.
    if pending is not None:
      collect(pending)
    pending = out
    if bar is not None:
      bar.update(1)
    elif progress and jax.process_index() == 0 and step % 100 == 99:
      rate = (step + 1) / (time.time() - start)
      eta = f", eta {(total - step - 1) / rate:.0f}s" if total else ""
      logging.info("features: %d batches, %.1f batch/s%s", step + 1, rate, eta)
  if pending is not None:
    collect(pending)
  if bar is not None:
    bar.close()
  if not feats:
    raise ValueError("extract_features: no batches")
  return np.concatenate(feats), np.concatenate(labels), np.concatenate(indices)


# ------------------------------------------------------------------------------------------------- kNN

def _l2_normalize(x):
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def _scan_topk(test, train, train_labels, row0, n_train, *, k, train_chunk, precision):
  """Top-k (similarity, label) of unit test rows over train rows, scanned in chunks with a running
  top-k so memory is [test chunk, train chunk] whatever the train-set size. row0: global row of
  train[0]; rows >= n_train are padding."""
  def body(carry, i):
    best_sim, best_lab = carry
    tr = jax.lax.dynamic_slice_in_dim(train, i * train_chunk, train_chunk)
    lab = jax.lax.dynamic_slice_in_dim(train_labels, i * train_chunk, train_chunk)
    sim = jnp.dot(test, tr.T, precision=precision)
    row = row0 + i * train_chunk + jnp.arange(train_chunk)
    sim = jnp.where(row[None] < n_train, sim, -jnp.inf)
    s, j = jax.lax.top_k(sim, min(k, train_chunk))
    # Running best first: top_k's lower-index-wins tie order then holds over the whole train set.
    all_s = jnp.concatenate([best_sim, s], axis=1)
    all_l = jnp.concatenate([best_lab, lab[j]], axis=1)
    s, j = jax.lax.top_k(all_s, k)
    return (s, jnp.take_along_axis(all_l, j, axis=1)), None

  init = (jnp.full((test.shape[0], k), -jnp.inf, jnp.float32), jnp.zeros((test.shape[0], k), jnp.int32))
  out, _ = jax.lax.scan(body, init, jnp.arange(train.shape[0] // train_chunk))
  return out


@functools.partial(jax.jit, static_argnames=("k", "num_classes", "train_chunk", "precision", "mesh"))
def _knn_predict_chunk(test, train, train_labels, n_train, temperature, *, k, num_classes, train_chunk,
                       precision, mesh):
  test = _l2_normalize(test)
  kw = dict(k=k, train_chunk=train_chunk, precision=precision)
  if mesh is None:
    sim, lab = _scan_topk(test, train, train_labels, 0, n_train, **kw)
  else:
    # Train rows sharded over the mesh: each device takes the top-k of its own rows, then the
    # D x k candidates are gathered (device-major = global row order, so ties break as unsharded).
    def local(test, train, train_labels, n_train):
      row0 = jax.lax.axis_index(shd.DATA_AXIS) * train.shape[0]
      s, l = _scan_topk(test, train, train_labels, row0, n_train, **kw)
      s = jax.lax.all_gather(s, shd.DATA_AXIS, axis=1, tiled=True)
      l = jax.lax.all_gather(l, shd.DATA_AXIS, axis=1, tiled=True)
      s, j = jax.lax.top_k(s, k)
      return s, jnp.take_along_axis(l, j, axis=1)

    row, rep = jax.sharding.PartitionSpec(shd.DATA_AXIS), jax.sharding.PartitionSpec()
    # check_vma off: the scan carry starts replicated and turns device-varying; the gathered top-k is
    # identical on every device, which out_specs=P() relies on.
    sim, lab = jax.shard_map(local, mesh=mesh, in_specs=(rep, row, row, rep), out_specs=(rep, rep),
                             check_vma=False)(
        test, train, train_labels, n_train)
  weights = jnp.exp(sim / temperature)                       # InstDisc / DINO weighting
  votes = jnp.sum(jax.nn.one_hot(lab, num_classes) * weights[..., None], axis=1)
  return jnp.argmax(votes, axis=-1).astype(jnp.int32)


def knn_classify(train_feats, train_labels, test_feats, num_classes: int, k: int = 20,
                 temperature: float = 0.07, chunk: int = 256, train_chunk: int = 65536,
                 precision: str = "highest", mesh=None) -> np.ndarray:
  """Weighted kNN (cosine similarity of L2-normalised features, vote weight exp(sim / T), top-k) ->
  predicted class per test row, int32 numpy. Train labels must lie in [0, num_classes).

  chunk: test rows per jitted call; train_chunk: train rows per scan step (per device). precision:
  matmul precision of the similarities ("highest" = true fp32 also on GPUs that default to TF32;
  "default" is several times faster there). mesh: shard the train features over its devices (every
  process passes the same arrays and gets all predictions); None = one device.
  """
  train_labels = np.asarray(train_labels, np.int32)
  test_feats = np.asarray(test_feats, np.float32)
  n_train = train_labels.shape[0]
  if n_train == 0:
    raise ValueError("knn_classify: empty train set")
  k = min(k, n_train)
  shards = 1 if mesh is None else mesh.devices.size
  train_chunk = min(train_chunk, -(-n_train // shards))
  n_pad = -(-n_train // (shards * train_chunk)) * shards * train_chunk
  if mesh is None:
    put = jnp.asarray
    put_rep = jnp.asarray
  else:
    # make_array_from_callback, not device_put: on a multi-process mesh device_put first all-gathers the
    # whole host array to check it is equal everywhere (10 GB of ImageNet features x processes). Every
    # process holds the same arrays here, so each device just takes its slice.
    def put_with(sharding):
      return lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx])
    put, put_rep = put_with(shd.batch_sharded(mesh)), put_with(shd.replicated(mesh))
  train = jax.jit(_l2_normalize)(put(_pad_rows(np.asarray(train_feats, np.float32), n_pad)))
  labels = put(_pad_rows(train_labels, n_pad))
  n_train_arr, temp = put_rep(np.int32(n_train)), put_rep(np.float32(temperature))
  kw = dict(k=k, num_classes=int(num_classes), train_chunk=train_chunk, precision=precision, mesh=mesh)
  preds = []
  chunk = min(chunk, max(len(test_feats), 1))
  for s in range(0, len(test_feats), chunk):
    part = test_feats[s:s + chunk]
    # Fixed chunk shape: one compilation for the whole test set.
    preds.append((_knn_predict_chunk(put_rep(_pad_rows(part, chunk)), train, labels, n_train_arr, temp, **kw),
                  len(part)))
  # Fetched at the end so that chunk dispatch stays asynchronous.
  return np.concatenate([np.asarray(p)[:n] for p, n in preds]) if preds else np.zeros((0,), np.int32)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes: int, k: int = 20,
                 temperature: float = 0.07, **kwargs) -> float:
  """Top-1 accuracy of `knn_classify` on the test rows."""
  pred = knn_classify(train_feats, train_labels, test_feats, num_classes, k, temperature, **kwargs)
  return float(np.mean(pred == np.asarray(test_labels)))


# --------------------------------------------------------------------------------------- linear probe

def _probe_logits(params, x, mu, sd):
  return ((x - mu) / sd) @ params["kernel"] + params["bias"]


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def _probe_topk(params, x, mu, sd, *, k, chunk):
  # lax.map over row chunks: logits never exceed [chunk, C] (1.28M x 1000 would be 5 GB).
  xs = x.reshape(-1, chunk, x.shape[-1])
  return jax.lax.map(lambda c: jax.lax.top_k(_probe_logits(params, c, mu, sd), k)[1], xs).reshape(-1, k)


def _probe_accuracy(params, x, y, mu, sd, k, chunk=4096):
  n = x.shape[0]
  chunk = min(chunk, n)
  n_pad = -(-n // chunk) * chunk
  xp = jnp.pad(x, ((0, n_pad - n), (0, 0)))
  top = np.asarray(_probe_topk(params, xp, mu, sd, k=k, chunk=chunk))[:n]
  y = np.asarray(y)
  return float(np.mean(top[:, 0] == y)), float(np.mean((top == y[:, None]).any(axis=1)))


def linear_probe(train_feats, train_labels, test_feats, test_labels, num_classes: int, epochs: int = 100,
                 batch_size: int = 256, lr: float = 0.3, weight_decay: float = 1e-6, seed: int = 0,
                 standardize: bool = False, momentum: float = 0.9, nesterov: bool = False) -> dict:
  """Train Linear(F, num_classes) on frozen features; return test/train accuracy.

  SGD with momentum and PyTorch-style coupled weight decay (on weight and bias, as SwAV's eval_linear),
  LR cosine-decayed per step from `lr` to 0, mean cross-entropy, init N(0, 0.01) weight and zero bias.
  Each epoch is one jitted scan over a random permutation (the last partial batch is dropped).
  standardize: scale every feature to zero mean / unit variance using train-set statistics.
  Features live on one device: fine up to ImageNet x 2048 (10 GB) on an 80 GB GPU.
  """
  x = jnp.asarray(np.asarray(train_feats, np.float32))
  y = jnp.asarray(np.asarray(train_labels, np.int32))
  xt = jnp.asarray(np.asarray(test_feats, np.float32))
  n, dim = x.shape
  if standardize:
    mu = jnp.mean(x, axis=0)
    sd = jnp.std(x, axis=0) + 1e-6
  else:
    mu, sd = jnp.zeros((dim,), jnp.float32), jnp.ones((dim,), jnp.float32)
  bs = min(batch_size, n)
  steps = n // bs
  schedule = optax.cosine_decay_schedule(lr, steps * epochs)
  tx = optax.chain(optax.add_decayed_weights(weight_decay),
                   optax.sgd(schedule, momentum=momentum, nesterov=nesterov))
  key, init_key = jax.random.split(jax.random.PRNGKey(seed))
  params = {"kernel": 0.01 * jax.random.normal(init_key, (dim, num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32)}
  opt_state = tx.init(params)

  def loss_fn(params, xb, yb):
    logits = _probe_logits(params, xb, mu, sd)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def run_epoch(params, opt_state, key, x, y):
    perm = jax.random.permutation(key, n)[:steps * bs].reshape(steps, bs)

    def step(carry, idx):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), perm)
    return params, opt_state, losses.mean()

  loss = jnp.nan
  for epoch in range(epochs):
    params, opt_state, loss = run_epoch(params, opt_state, jax.random.fold_in(key, epoch), x, y)
  k = min(5, num_classes)
  top1, top5 = _probe_accuracy(params, xt, test_labels, mu, sd, k)
  train_top1, _ = _probe_accuracy(params, x, train_labels, mu, sd, 1)
  return dict(accuracy=top1, top5=top5, train_accuracy=train_top1, final_loss=float(loss),
              epochs=int(epochs), steps=int(steps * epochs))


# ------------------------------------------------------------------------------------------ end to end

def evaluate_on_features(train_feats, train_labels, test_feats, test_labels, protocol=None,
                         num_classes: int | None = None, linear: bool = True, mesh=None) -> dict:
  """kNN (train features sharded over `mesh` if given) + linear probe (one device) on extracted
  features. Rows with label < 0 (unknown) are dropped."""
  protocol = fast_protocol() if protocol is None else protocol
  tr, te = np.asarray(train_labels) >= 0, np.asarray(test_labels) >= 0
  train_feats, train_labels = np.asarray(train_feats)[tr], np.asarray(train_labels)[tr]
  test_feats, test_labels = np.asarray(test_feats)[te], np.asarray(test_labels)[te]
  if len(train_labels) == 0 or len(test_labels) == 0:
    return {"skipped": "no labelled rows"}
  if num_classes is None:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  res = dict(num_train=int(len(train_labels)), num_test=int(len(test_labels)),
             feature_dim=int(train_feats.shape[1]), num_classes=int(num_classes), protocol=protocol.name)
  t0 = time.time()
  res["knn_top1"] = knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes,
                                 k=protocol.knn_k, temperature=protocol.knn_temperature, mesh=mesh)
  res["knn_k"] = int(protocol.knn_k)
  res["knn_s"] = time.time() - t0
  if linear:
    t0 = time.time()
    probe = linear_probe(train_feats, train_labels, test_feats, test_labels, num_classes,
                         **{k: protocol[k] for k in _PROBE_KEYS})
    res.update({"linear_top1": probe["accuracy"], "linear_top5": probe["top5"],
                "linear_train_top1": probe["train_accuracy"], "linear_final_loss": probe["final_loss"],
                "linear_s": time.time() - t0})
  return res


def default_image_size(data_cfg) -> int:
  """Eval resolution: the digits upscaling size, else 224 (the published protocol: Resize 256, crop 224,
  whatever the training crops were)."""
  if data_cfg.source == "digits":
    return int(data_cfg.image_size_digits)
  return 224


def split_features(apply_fn, variables, data_cfg, split: str, *, batch_size: int = 256,
                   image_size: int | None = None, mesh=None, mean=DEFAULT_MEAN, std=DEFAULT_STD,
                   batches_fn: Callable | None = None, progress: bool = True):
  """extract_features over a whole split of the configured dataset -> (features, labels, indices).

  batches_fn defaults to dcv2_jax.data.eval_batches(data_cfg, split, batch_size, image_size), which
  yields batch_size rows per process (each process its own contiguous share of the split).
  """
  if batches_fn is None:
    from dcv2_jax.data import eval_batches as batches_fn  # the data pipeline pulls in grain/tfds
  image_size = default_image_size(data_cfg) if image_size is None else image_size
  batches = batches_fn(data_cfg, split, batch_size, image_size)
  return extract_features(apply_fn, variables, batches, mesh, mean=mean, std=std, progress=progress)


def evaluate_features(apply_fn, variables, data_cfg, *, protocol=None, mesh=None, batch_size=None,
                      image_size=None, mean=DEFAULT_MEAN, std=DEFAULT_STD, train_split=None, test_split=None,
                      linear: bool = True, batches_fn=None, return_features: bool = False, progress=True):
  """Extract features of data_cfg.split (train) and data_cfg.eval_split (test), then kNN + probe.

  Returns the results dict (JSON-ready), or (results, dict(train=(f, l, i), test=(f, l, i))) when
  return_features. With no eval split configured, returns {"skipped": ...}.
  """
  protocol = fast_protocol() if protocol is None else protocol
  train_split = data_cfg.split if train_split is None else train_split
  test_split = data_cfg.get("eval_split", "") if test_split is None else test_split
  if not test_split:
    res = {"skipped": "no eval_split configured"}
    return (res, {}) if return_features else res
  batch_size = protocol.extract_batch_size if batch_size is None else batch_size
  mesh = shd.make_mesh() if mesh is None else mesh
  kw = dict(batch_size=batch_size, image_size=image_size, mesh=mesh, mean=mean, std=std,
            batches_fn=batches_fn, progress=progress)
  t0 = time.time()
  train = split_features(apply_fn, variables, data_cfg, train_split, **kw)
  test = split_features(apply_fn, variables, data_cfg, test_split, **kw)
  extract_s = time.time() - t0
  res = evaluate_on_features(train[0], train[1], test[0], test[1], protocol, linear=linear, mesh=mesh)
  res.update(train_split=train_split, test_split=test_split, extract_s=extract_s)
  return (res, dict(train=train, test=test)) if return_features else res


# --------------------------------------------------------------------------- cluster quality (workdir)

def latest_assignments(workdir: str) -> str | None:
  files = sorted(glob.glob(os.path.join(workdir, "assignments", "epoch_*.npz")))
  return files[-1] if files else None


def assignment_quality(workdir: str, train_labels, train_index, num_clusters=None,
                       write: bool = True) -> dict | None:
  """NMI/ARI/purity per head of the latest `<workdir>/assignments/epoch_*.npz` against the labels of
  the training split (matched by dataset index); writes assignments/latest_with_labels.npz (if write).
  None when the workdir has no assignment file."""
  path = latest_assignments(workdir)
  if path is None:
    return None
  with np.load(path) as f:
    table = np.asarray(f["assignments"])
    index = np.asarray(f["index"]) if "index" in f else np.arange(table.shape[-1])
  table = table[None] if table.ndim == 1 else table
  n = table.shape[1]
  labels = np.full(n, -1, np.int32)
  train_index = np.asarray(train_index)
  ok = (train_index >= 0) & (train_index < n)
  labels[train_index[ok]] = np.asarray(train_labels)[ok]
  if num_clusters is None or np.ndim(num_clusters) and len(num_clusters) != table.shape[0]:
    num_clusters = [int(max(t.max(), 0)) + 1 for t in table]
  health = cluster_metrics.cluster_health(table, num_clusters, labels=labels)
  if write:
    np.savez(os.path.join(workdir, "assignments", "latest_with_labels.npz"),
             assignments=table, index=index, labels=labels)
  health["file"] = os.path.basename(path)
  health["labelled"] = int((labels >= 0).sum())
  return health


# ------------------------------------------------------------------------------------------------- CLI

def load_config(path: str | None, workdir: str | None) -> ml_collections.ConfigDict:
  """--config (a .json or a configs/*.py file with get_config(), optionally 'file.py:arg'), else
  <workdir>/config.json, else dcv2_jax.config.base_config()."""
  if path is None and workdir and os.path.exists(os.path.join(workdir, "config.json")):
    path = os.path.join(workdir, "config.json")
  if path is None:
    from dcv2_jax.config import base_config
    return base_config()
  if path.endswith(".json"):
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  import importlib.util
  file, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("_eval_config", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


DATA_OVERRIDES = ("source", "path", "name", "split", "eval_split")


def add_data_flags(parser) -> None:
  """--data.KEY flags that override the run config's data section (evaluate and linear_eval CLIs)."""
  for key in DATA_OVERRIDES:
    parser.add_argument(f"--data.{key}", dest=f"data_{key}", help=f"override config data.{key}")


def run_config(args) -> ml_collections.ConfigDict:
  """The config of --config / <--workdir>/config.json with the --data.KEY overrides applied."""
  cfg = load_config(args.config, args.workdir)
  for key in DATA_OVERRIDES:
    if getattr(args, f"data_{key}") is not None:
      cfg.data[key] = getattr(args, f"data_{key}")
  return cfg


def _parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m dcv2_jax.evaluate", description=__doc__.split("\n")[0])
  p.add_argument("--workdir", help="training workdir: weights, config.json, assignments; results appended "
                                   "to its metrics.jsonl")
  p.add_argument("--weights", help="anything dcv2_jax.load_trunk accepts (default: --workdir)")
  p.add_argument("--config", help="config .py (get_config) or .json (default: <workdir>/config.json)")
  add_data_flags(p)
  p.add_argument("--protocol", choices=("auto", "fast", "imagenet"), default="auto",
                 help="auto: fast for the digits source, imagenet otherwise")
  p.add_argument("--image_size", type=int, help="eval resolution (default: digits size / largest crop)")
  p.add_argument("--batch_size", type=int, help="feature-extraction batch per process")
  p.add_argument("--knn_k", type=int)
  p.add_argument("--no_linear", action="store_true", help="kNN only")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = _parse_args(argv)
  from dcv2_jax import distributed
  distributed.initialize()       # joins the other processes when launched under SLURM / Open MPI / k8s
  logging.set_verbosity(logging.INFO)       # feature-extraction progress
  if not (args.workdir or args.weights):
    raise SystemExit("give --workdir or --weights")
  cfg = run_config(args)
  name = args.protocol if args.protocol != "auto" else ("fast" if cfg.data.source == "digits" else "imagenet")
  protocol = get_protocol(name)
  if args.knn_k:
    protocol.knn_k = args.knn_k

  from dcv2_jax import load_trunk  # written alongside export; imported late so this module stands alone
  weights = args.weights or args.workdir
  apply_fn, variables = load_trunk(weights)
  mean = tuple(cfg.get("augment", {}).get("mean", DEFAULT_MEAN))
  std = tuple(cfg.get("augment", {}).get("std", DEFAULT_STD))
  res, arrays = evaluate_features(apply_fn, variables, cfg.data, protocol=protocol, mesh=shd.make_mesh(),
                                  batch_size=args.batch_size, image_size=args.image_size, mean=mean, std=std,
                                  linear=not args.no_linear, return_features=True)
  res["weights"] = weights
  if args.workdir and "train" in arrays:
    num_clusters = list(cfg.get("loss", {}).get("num_clusters", [])) or None
    clusters = assignment_quality(args.workdir, arrays["train"][1], arrays["train"][2], num_clusters,
                                  write=jax.process_index() == 0)
    if clusters is not None:
      res["clusters"] = clusters
  if jax.process_index() == 0:
    print(json.dumps({"eval": res}, indent=1, default=float))
    if args.workdir:
      with open(os.path.join(args.workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"eval": res}, default=float) + "\n")
  return res


if __name__ == "__main__":
  main(sys.argv[1:])
