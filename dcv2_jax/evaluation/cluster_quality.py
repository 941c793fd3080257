"""How well a run's clusters match the labels: NMI/ARI/purity of its newest saved assignment table."""
from __future__ import annotations

import os

import numpy as np

from dcv2_jax.clusters import assignments
from dcv2_jax.clusters import metrics as cluster_metrics


def assignment_quality(workdir: str, train_labels, train_index, num_clusters=None, write: bool = True) -> dict | None:
  """NMI/ARI/purity per head of the newest `<workdir>/assignments/epoch_*.npz` against the labels of the
  training split (matched by dataset index); writes assignments/latest_with_labels.npz (if write).
  None when the workdir has no assignment file."""
  saved = assignments.files(workdir)
  if not saved:
    return None
  table, index = assignments.load(saved[-1])
  n = table.shape[1]
  labels = np.full(n, -1, np.int32)
  train_index = np.asarray(train_index)
  ok = (train_index >= 0) & (train_index < n)
  labels[train_index[ok]] = np.asarray(train_labels)[ok]
  if num_clusters is None or np.ndim(num_clusters) and len(num_clusters) != table.shape[0]:
    num_clusters = [int(max(t.max(), 0)) + 1 for t in table]
  health = cluster_metrics.cluster_health(table, num_clusters, labels=labels)
  if write:
    np.savez(os.path.join(workdir, assignments.FOLDER, "latest_with_labels.npz"),
             assignments=table, index=index, labels=labels)
  health["file"] = os.path.basename(saved[-1])
  health["labelled"] = int((labels >= 0).sum())
  return health
