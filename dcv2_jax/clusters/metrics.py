"""Cluster-quality metrics for DCv2 assignment tables, in plain numpy.

The trainer calls `cluster_health` every epoch on the [H, N] assignment table (N = 1.28M, K = 3000 at
ImageNet scale), so nothing here builds a dense N x K one-hot: labels are compacted to 0..n-1 with a
bincount lookup table, and the contingency table is a bincount (or a sort, when the dense table would
be large) of pair codes `a * nb + b`, kept sparse as (row, col, count) triples.

Conventions: assignment entries < 0 (the table uses -100) mean "sample absent"; label entries < 0 (-1)
mean "unknown". Both are dropped pairwise before any metric. NMI uses arithmetic averaging and both
NMI and ARI follow scikit-learn's special cases, so the numbers match `sklearn.metrics` exactly.
"""
from __future__ import annotations

import numpy as np

# A dense na x nb bincount is used while it has at most this many cells (9M for 3000 x 3000 is fine);
# beyond it the pair codes are sorted instead.
_DENSE_CONTINGENCY_MAX = 1 << 25


def _compact(x: np.ndarray):
  """Relabel x to 0..n-1 (order of the original values). Returns (codes int64, counts per code)."""
  x = np.asarray(x).ravel()
  if x.size and np.issubdtype(x.dtype, np.integer) and x.min() >= 0 and x.max() < 4 * x.size + 65536:
    # Cluster ids and class labels are small non-negative ints: a bincount replaces a sort.
    counts = np.bincount(x)
    present = counts > 0
    lut = np.cumsum(present) - 1
    return lut[x].astype(np.int64), counts[present].astype(np.int64)
  _, codes, counts = np.unique(x, return_inverse=True, return_counts=True)
  return codes.ravel().astype(np.int64), counts.astype(np.int64)


def contingency(a, b):
  """Sparse contingency table of two labelings of equal length.

  Returns (rows, cols, counts, a_counts, b_counts): nonzero cells in row-major order (so the cells of
  one row are contiguous) and the marginals. Rows index the distinct values of `a`, cols those of `b`.
  """
  a = np.asarray(a).ravel()
  b = np.asarray(b).ravel()
  if a.shape != b.shape:
    raise ValueError(f"labelings differ in length: {a.shape} vs {b.shape}")
  ca, a_counts = _compact(a)
  cb, b_counts = _compact(b)
  na, nb = len(a_counts), len(b_counts)
  code = ca * nb + cb
  if na * nb <= max(_DENSE_CONTINGENCY_MAX, 4 * a.size):
    flat = np.bincount(code, minlength=na * nb)
    cells = np.flatnonzero(flat)
    counts = flat[cells]
  else:
    cells, counts = np.unique(code, return_counts=True)
  return cells // nb, cells % nb, counts.astype(np.int64), a_counts, b_counts


def _entropy_from_counts(counts: np.ndarray) -> float:
  counts = counts[counts > 0].astype(np.float64)
  n = counts.sum()
  if n == 0:
    return 0.0
  p = counts / n
  return float(-(p * np.log(p)).sum())


def _mutual_info(rows, cols, counts, a_counts, b_counts) -> float:
  n = float(a_counts.sum())
  c = counts.astype(np.float64)
  outer = a_counts[rows].astype(np.float64) * b_counts[cols].astype(np.float64)
  mi = (c / n) * (np.log(c) - np.log(outer) + np.log(n))
  return float(max(mi.sum(), 0.0))


def nmi(a, b) -> float:
  """Normalised mutual information, arithmetic mean of the entropies (sklearn's default).

  Every entry counts (mask before calling, or use `cluster_health`). NaN for empty input.
  """
  a = np.asarray(a).ravel()
  if a.size == 0:
    return float("nan")
  rows, cols, counts, a_counts, b_counts = contingency(a, b)
  # sklearn: both sides a single cluster is a perfect match; otherwise MI 0 gives 0.
  if len(a_counts) == len(b_counts) == 1:
    return 1.0
  mi = _mutual_info(rows, cols, counts, a_counts, b_counts)
  if mi == 0.0:
    return 0.0
  return mi / (0.5 * (_entropy_from_counts(a_counts) + _entropy_from_counts(b_counts)))


def adjusted_rand_index(a, b) -> float:
  """Adjusted Rand index (Hubert & Arabie), as sklearn.metrics.adjusted_rand_score. NaN for empty input."""
  a = np.asarray(a).ravel()
  if a.size == 0:
    return float("nan")
  _, _, counts, a_counts, b_counts = contingency(a, b)
  # Pair-confusion counts (ordered pairs, as sklearn); Python ints because tp * tn overflows int64
  # at ImageNet scale.
  n = int(a.size)
  sum_sq = int((counts * counts).sum())
  fn = int((a_counts * a_counts).sum()) - sum_sq
  fp = int((b_counts * b_counts).sum()) - sum_sq
  tp = sum_sq - n
  tn = n * n - fp - fn - sum_sq
  if fn == 0 and fp == 0:
    return 1.0
  return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def purity(assign, labels) -> float:
  """Fraction of samples whose label is the majority label of their cluster. NaN for empty input."""
  assign = np.asarray(assign).ravel()
  if assign.size == 0:
    return float("nan")
  rows, _, counts, a_counts, _ = contingency(assign, labels)
  # Cells are row-major, so each cluster's cells are one contiguous run: max over runs.
  starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
  return float(np.maximum.reduceat(counts, starts).sum() / assign.size)


def cluster_sizes(assign, num_clusters: int) -> np.ndarray:
  """Members per cluster [num_clusters], ignoring entries < 0 (absent samples)."""
  assign = np.asarray(assign).ravel()
  return np.bincount(assign[assign >= 0], minlength=num_clusters)[:num_clusters]


def cluster_size_entropy(sizes, normalized: bool = True) -> float:
  """Entropy of the cluster-size distribution (sizes [K], e.g. `cluster_sizes`); normalised by log K
  (1 = all clusters equal), else nats."""
  sizes = np.asarray(sizes)
  h = _entropy_from_counts(sizes)
  if not normalized:
    return h
  return float(h / np.log(len(sizes))) if len(sizes) > 1 else 1.0


def empty_clusters(sizes) -> int:
  """Clusters with no member (sizes [K], e.g. `cluster_sizes`)."""
  return int((np.asarray(sizes) == 0).sum())


def cluster_health(table, num_clusters, prev_table=None, labels=None, sizes=None) -> dict:
  """Per-head health of an assignment table [H, N] (entries < 0 = sample absent).

  num_clusters: an int or one per head. prev_table: last epoch's table, for the stability NMI over
  samples present in both. labels: [N] class labels (< 0 = unknown) for NMI/ARI/purity. sizes: [H, K]
  members per cluster if k-means counted them already (else counted from the table).
  Returns a dict of per-head lists of plain Python numbers (JSON-ready); absent keys mean "not given".
  """
  table = np.asarray(table)
  if table.ndim == 1:
    table = table[None]
  num_heads = table.shape[0]
  ks = [int(num_clusters)] * num_heads if np.ndim(num_clusters) == 0 else [int(k) for k in num_clusters]
  if len(ks) != num_heads:
    raise ValueError(f"{len(ks)} cluster counts for {num_heads} heads")
  if prev_table is not None:
    prev_table = np.asarray(prev_table)
    prev_table = prev_table[None] if prev_table.ndim == 1 else prev_table
  if labels is not None:
    labels = np.asarray(labels).ravel()
    if labels.shape[0] != table.shape[1]:
      raise ValueError(f"labels has {labels.shape[0]} entries, table {table.shape[1]} columns")

  out = {k: [] for k in ("assigned", "empty_clusters", "size_entropy", "size_entropy_nats",
                         "largest_cluster_frac")}
  if prev_table is not None:
    out["nmi_prev"] = []
  if labels is not None:
    out.update(nmi_labels=[], ari_labels=[], purity_labels=[])
  for h in range(num_heads):
    a = table[h]
    present = a >= 0
    head_sizes = cluster_sizes(a, ks[h]) if sizes is None else np.asarray(sizes[h])[:ks[h]]
    n = int(head_sizes.sum())
    out["assigned"].append(n)
    out["empty_clusters"].append(empty_clusters(head_sizes))
    out["size_entropy_nats"].append(cluster_size_entropy(head_sizes, normalized=False))
    out["size_entropy"].append(cluster_size_entropy(head_sizes))
    out["largest_cluster_frac"].append(float(head_sizes.max() / n) if n else float("nan"))
    if prev_table is not None:
      p = prev_table[h]
      both = present & (p >= 0)
      out["nmi_prev"].append(nmi(a[both], p[both]))
    if labels is not None:
      m = present & (labels >= 0)
      out["nmi_labels"].append(nmi(a[m], labels[m]))
      out["ari_labels"].append(adjusted_rand_index(a[m], labels[m]))
      out["purity_labels"].append(purity(a[m], labels[m]))
  return out
