"""Weighted k-nearest-neighbour classification of frozen features (InstDisc / DINO): cosine similarity of
L2-normalised features, the k most similar train rows vote with weight exp(sim / T).

The train features may be sharded over the mesh: each device takes the top-k of its own rows and only
the D x k candidates are gathered, so memory is [test chunk, train chunk] whatever the train-set size.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dcv2_jax import sharding as shd
from dcv2_jax.conventions import l2_normalize
from dcv2_jax.evaluation.features import pad_rows
from dcv2_jax.run import distributed


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


@functools.partial(distributed.jit, static_argnames=("k", "num_classes", "train_chunk", "precision", "mesh"))
def _knn_predict_chunk(test, train, train_labels, n_train, temperature, *, k, num_classes, train_chunk,
                       precision, mesh):
  test = l2_normalize(test)
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
  train = jax.jit(l2_normalize)(put(pad_rows(np.asarray(train_feats, np.float32), n_pad)))
  labels = put(pad_rows(train_labels, n_pad))
  n_train_arr, temp = put_rep(np.int32(n_train)), put_rep(np.float32(temperature))
  kw = dict(k=k, num_classes=int(num_classes), train_chunk=train_chunk, precision=precision, mesh=mesh)
  preds = []
  chunk = min(chunk, max(len(test_feats), 1))
  for s in range(0, len(test_feats), chunk):
    part = test_feats[s:s + chunk]
    # Fixed chunk shape: one compilation for the whole test set.
    preds.append((_knn_predict_chunk(put_rep(pad_rows(part, chunk)), train, labels, n_train_arr, temp, **kw),
                  len(part)))
  # Fetched at the end so that chunk dispatch stays asynchronous.
  return np.concatenate([np.asarray(p)[:n] for p, n in preds]) if preds else np.zeros((0,), np.int32)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes: int, k: int = 20,
                 temperature: float = 0.07, **kwargs) -> float:
  """Top-1 accuracy of `knn_classify` on the test rows."""
  pred = knn_classify(train_feats, train_labels, test_feats, num_classes, k, temperature, **kwargs)
  return float(np.mean(pred == np.asarray(test_labels)))
