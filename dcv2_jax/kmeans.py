"""Step 1 of every epoch: spherical k-means of each head over last epoch's memory bank.

`cluster_heads` runs the heads one after the other, as the reference does (head h clusters bank
h % banks), and returns the centroids the loss scores against, the assignment table the loss takes its
targets from, and the cluster sizes. `lloyd` is one head's Lloyd iterations.

Memory: the bank is never scored against all K centroids at once. Rows are viewed as
[shards, chunks, chunk, D] and a scan walks the chunk axis, so every device scores `chunk` of its own rows
per iteration ([shards*chunk, K] live at a time) and accumulates its own per-cluster sums; the sums cross
devices once per Lloyd iteration (one all-reduce of [K, D], inserted by XLA). With one shard per device of
the mesh the bank is split over, every reshape here keeps rows on their device.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec as P

from dcv2_jax import kmeans_kernel, memory_bank
from dcv2_jax.conventions import IGNORE, PRECISIONS, l2_normalize

# The choices of each KMeansSettings field (config.py validates the config against these).
DTYPES = ("float32", "bfloat16")        # matmul inputs: float32 (TF32 on GPU by default) | bfloat16
SUMS = ("scatter", "onehot")            # per-cluster sums: add rows | one-hot matmul
ASSIGN = ("xla", "pallas")              # nearest centroid: matmul + argmax | the fused kernel
EMPTY_CLUSTERS = ("keep", "reseed")     # an empty cluster keeps its centroid (reference) | moves to a far row


@dataclasses.dataclass(frozen=True)
class KMeansSettings:
  """How k-means runs (not what it computes, which is fixed by the bank, K and the iterations).

  Frozen and hashable: jitted functions take it as one static argument instead of six.
  """
  chunk_size: int = 65536           # bank rows per device scored at a time (memory: chunk x K floats)
  empty_clusters: str = "keep"
  dtype: str = "float32"
  sums: str = "scatter"
  assign: str = "xla"
  precision: jax.lax.Precision | None = None   # matmul precision of the scores; None = the backend default

  def __post_init__(self):
    for name, allowed in (("empty_clusters", EMPTY_CLUSTERS), ("dtype", DTYPES), ("sums", SUMS),
                          ("assign", ASSIGN)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"k-means {name}={getattr(self, name)!r}: use one of {', '.join(allowed)}")

  @classmethod
  def from_config(cls, loss_cfg) -> "KMeansSettings":
    return cls(chunk_size=int(loss_cfg.kmeans_chunk), empty_clusters=loss_cfg.empty_clusters,
               dtype=loss_cfg.kmeans_dtype, sums=loss_cfg.kmeans_sums, assign=loss_cfg.kmeans_assign,
               precision=PRECISIONS[loss_cfg.kmeans_precision])


def init_centroids(key, bank, num_clusters: int, valid=None):
  """K distinct valid rows of the bank, drawn with `key` (the same key on every process: same result)."""
  n = bank.shape[0]
  p = None if valid is None else valid.astype(jnp.float32) / jnp.maximum(valid.sum(), 1)
  rows = jax.random.choice(key, n, (num_clusters,), replace=False, p=p)
  return bank[rows].astype(jnp.float32)


def cluster_heads(key, bank: memory_bank.MemoryBank, num_clusters, num_iters: int, num_examples: int,
                  settings: KMeansSettings = KMeansSettings(), mesh=None):
  """k-means for every head, one after the other (head h clusters bank h % banks).

  Returns (centroids [H, K, D], assignment table [H, num_examples] with -100 where a sample is not in the
  bank, cluster sizes [H, K]). Heads may have different numbers of clusters (VISSL accepts them): K is the
  largest, and head h's centroids and sizes beyond its own K_h are zero (loss.py masks those logits).
  """
  z, index = memory_bank.rows(bank)
  valid = index >= 0
  k_max = max(num_clusters)
  centroids, assigns, sizes = [], [], []
  for h, k in enumerate(num_clusters):
    rows = z[h % z.shape[0]]
    ok = valid & jnp.all(jnp.isfinite(rows), axis=-1)     # defensive: a NaN row would poison every centroid
    init = init_centroids(jax.random.fold_in(key, h), rows, k, ok)
    c, a = lloyd(rows, init, num_iters, ok, settings, mesh=mesh)
    centroids.append(jnp.pad(c, ((0, k_max - k), (0, 0))))
    assigns.append(a)
    # -100 -> index k_max, out of range, dropped (a negative index would wrap around instead).
    sizes.append(jnp.zeros((k_max,), jnp.int32).at[jnp.where(a >= 0, a, k_max)].add(1, mode="drop"))
  table = memory_bank.assignment_table(jnp.stack(assigns), index, num_examples)
  return jnp.stack(centroids), table, jnp.stack(sizes)


def recluster(state, key, *, num_clusters, num_iters: int, settings: KMeansSettings, mesh=None):
  """The start of an epoch: k-means of every head on `state`'s memory bank -> (state with the new centroids and
  assignment table, cluster sizes [H, K]). `state` is train_step.TrainState (bank, centroids, table)."""
  centroids, table, sizes = cluster_heads(key, state.bank, num_clusters, num_iters, state.table.shape[1], settings,
                                          mesh)
  return state.replace(centroids=centroids, table=table), sizes


# ------------------------------------------------------------------------------------------ Lloyd

def _chunked_view(x, shards: int, chunk: int, fill):
  """[N, ...] -> [M, shards, c, ...] with c <= chunk; padding (with `fill`) stays inside each shard."""
  n = x.shape[0]
  local = n // shards
  c = max(1, min(chunk, local))
  m = -(-local // c)
  x = x.reshape((shards, local) + x.shape[1:])
  pad = m * c - local
  if pad:
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
  x = x.reshape((shards, m, c) + x.shape[2:])
  return jnp.moveaxis(x, 1, 0), local


def _cluster_sums(x, a, k, method, precision):
  """Per-shard member sums [P, K, D] and counts [P, K] of rows x [P, c, D] with assignments a [P, c].

  'scatter' adds each row into its cluster (reads the chunk once: O(c*D) memory traffic); 'onehot' is a
  one-hot [c, K] x [c, D] matmul (tensor cores, but writes and reads a [c, K] matrix). Rows assigned -100
  are dropped by both.
  """
  if method == "onehot":
    onehot = jax.nn.one_hot(a, k, dtype=x.dtype)                # -100 rows -> all zeros; exact in bf16
    return (jnp.einsum("pck,pcd->pkd", onehot, x, precision=precision, preferred_element_type=jnp.float32),
            onehot.sum(axis=1, dtype=jnp.float32))
  ids = jnp.where(a >= 0, a, k)                                 # out of range -> dropped
  per_shard = jax.vmap(lambda xs, i: (jax.ops.segment_sum(xs.astype(jnp.float32), i, k),
                                      jax.ops.segment_sum(jnp.ones(i.shape, jnp.float32), i, k)))
  return per_shard(x, ids)


@functools.cache
def _warn_no_fused_kernel(reason: str) -> None:
  logging.warning("loss.kmeans_assign=pallas: the fused kernel cannot run here (%s); k-means uses the XLA "
                  "assignment (loss.kmeans_assign=xla) instead: the same result, slower on a GPU.", reason)


def nearest(x, centroids, settings: KMeansSettings, mesh):
  """(argmax, max) over clusters of the scores of x [P, c, D] against centroids [K, D], each [P, c].

  'xla': an einsum then argmax/max (XLA writes the [P, c, K] scores to memory and reads them back);
  'pallas': the fused kernel of kmeans_kernel (GPU), split over `mesh` with shard_map when the shard axis
  lines up with the devices (a custom kernel is opaque to XLA's partitioner, which would gather the rows).
  Where the kernel cannot run (a JAX without Pallas' Triton backend) it warns once and uses 'xla'.
  """
  assign = settings.assign
  # The mesh's devices, not the default backend: the GPU compile check lowers for GPUs on a CPU-only machine.
  platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
  if assign == "pallas" and (reason := kmeans_kernel.unavailable_reason(platform)):
    _warn_no_fused_kernel(reason)
    assign = "xla"
  if assign == "xla":
    scores = jnp.einsum("pcd,kd->pck", x, centroids, precision=settings.precision,
                        preferred_element_type=jnp.float32)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32), jnp.max(scores, axis=-1)

  def per_device(xs, c):
    a, best = kmeans_kernel.nearest(xs.reshape(-1, xs.shape[-1]), c, precision=settings.precision,
                                    interpret=platform != "gpu")
    return a.reshape(xs.shape[:2]), best.reshape(xs.shape[:2])

  if mesh is not None and mesh.size > 1 and x.shape[0] % mesh.size == 0:
    axis = mesh.axis_names
    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(axis), P()), out_specs=(P(axis), P(axis)),
                         check_vma=False)(x, centroids)
  return per_device(x, centroids)


def _assign_pass(chunks, valid_chunks, centroids, settings: KMeansSettings, mesh, *, with_sums: bool,
                 want_best: bool):
  """One pass over the bank: assignments [M, P, c] (only without sums), best scores [M, P, c] (if
  want_best), and (with_sums) the per-cluster sums [K, D] and counts [K]. Outputs nobody reads are not
  built, so the update passes write nothing per row.

  The score matmul takes the bank's dtype (float32, or bfloat16 for speed) and accumulates in float32.
  """
  k, d = centroids.shape
  shards = chunks.shape[1]
  centroids = centroids.astype(chunks.dtype)

  def body(carry, xs):
    x, v = xs                                                   # [P,c,D], [P,c]
    a, best = nearest(x, centroids, settings, mesh)
    a = jnp.where(v, a, IGNORE)
    if with_sums:
      # Per-shard accumulators: the sum over shards (a cross-device all-reduce) waits until after the scan.
      s, n = _cluster_sums(x, a, k, settings.sums, settings.precision)
      carry = (carry[0] + s, carry[1] + n)
    return carry, (None if with_sums else a, jnp.where(v, best, jnp.inf) if want_best else None)

  init = (jnp.zeros((shards, k, d), jnp.float32), jnp.zeros((shards, k), jnp.float32)) if with_sums else None
  carry, (labels, best) = jax.lax.scan(body, init, (chunks, valid_chunks))
  if with_sums:
    sums, counts = carry
    return labels, best, sums.sum(0), counts.sum(0)
  return labels, best, None, None


def _reseed_empty(centroids, counts, chunks, best):
  """Move each empty cluster onto one of the rows farthest from their centroid (lowest best score)."""
  k = centroids.shape[0]
  flat_best = best.reshape(-1)
  flat_rows = chunks.reshape(-1, chunks.shape[-1])
  _, far = jax.lax.top_k(-flat_best, min(k, flat_best.shape[0]))
  empty = counts == 0
  rank = jnp.clip(jnp.cumsum(empty) - 1, 0, far.shape[0] - 1)
  cand = l2_normalize(flat_rows[far[rank]].astype(jnp.float32))
  return jnp.where(empty[:, None], cand, centroids)


@functools.partial(jax.jit, static_argnames=("num_iters", "settings", "mesh"))
def lloyd(bank, centroids, num_iters: int, valid=None, settings: KMeansSettings = KMeansSettings(), *,
          mesh=None):
  """Spherical k-means: `num_iters` update steps and `num_iters + 1` assignment steps.

  bank [N, D] unit rows; centroids [K, D] initial. An update sets each centroid to the L2-normalised
  mean of its members; a cluster with no members keeps its centroid (empty_clusters='keep', as the
  reference) or is moved onto a far-away row ('reseed'). valid [N] bool masks padding rows: their
  assignment is -100 and they count nowhere. Returns (centroids [K, D], assignments [N] int32).
  mesh: the mesh the bank is split over (rows contiguous per device), so that each device works on its
  own rows; without one the bank is treated as one shard.
  """
  n = bank.shape[0]
  shards = mesh.size if mesh is not None and n % mesh.size == 0 else 1
  valid = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
  # Masked rows become zeros: one_hot(-100) is zero, but 0 * NaN is not, so a NaN row must not reach the sums.
  bank = jnp.where(valid[:, None], bank, 0).astype(jnp.dtype(settings.dtype))
  chunks, local = _chunked_view(bank, shards, settings.chunk_size, 0.0)
  valid_chunks, _ = _chunked_view(valid, shards, settings.chunk_size, False)
  centroids = centroids.astype(jnp.float32)

  def update(_, c):
    _, best, total, counts = _assign_pass(chunks, valid_chunks, c, settings, mesh, with_sums=True,
                                          want_best=settings.empty_clusters == "reseed")
    new = jnp.where((counts > 0)[:, None], l2_normalize(total), c)
    if settings.empty_clusters == "reseed":
      new = _reseed_empty(new, counts, chunks, best)
    return new

  centroids = jax.lax.fori_loop(0, num_iters, update, centroids)
  labels, _, _, _ = _assign_pass(chunks, valid_chunks, centroids, settings, mesh, with_sums=False, want_best=False)
  # [M, P, c] -> [P, M*c] -> drop per-shard padding -> [N]
  labels = jnp.moveaxis(labels, 0, 1).reshape(shards, -1)[:, :local].reshape(n)
  return centroids, labels


def member_scores(bank: memory_bank.MemoryBank, centroids, table, head: int = 0):
  """(dataset index [N], cluster [N], score [N]) of every bank row in `head`: how close each sample is to its
  own centroid (cluster -100 and score -inf for empty slots). For the cluster pictures: the nearest members."""
  z, index = memory_bank.rows(bank)
  rows = z[head % z.shape[0]]
  present = index >= 0
  assignment = jnp.where(present, jnp.take(table[head], jnp.where(present, index, 0)), IGNORE)
  own = jnp.take(centroids[head], jnp.maximum(assignment, 0), axis=0)
  score = jnp.where(assignment >= 0, jnp.sum(rows * own, axis=-1), -jnp.inf)
  return index, assignment, score
