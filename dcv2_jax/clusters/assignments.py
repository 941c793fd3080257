"""The per-epoch k-means assignment tables on disk: <workdir>/assignments/epoch_XXXX.npz.

Each file holds `assignments` [heads, num_examples] int32 (the cluster of every sample by dataset index,
-100 for samples not in that epoch's memory bank) and `index` (0..num_examples-1), so clusters can be
inspected after training (VISSL cannot dump DCv2's clusters). Written by process 0 at every epoch start.
"""
from __future__ import annotations

import glob
import os

import numpy as np

FOLDER = "assignments"


def save(workdir: str, epoch: int, table, keep: int, **extra) -> str:
  """Writes epoch's table atomically (a temporary file, then a rename); keeps the newest `keep` (0 = all).
  extra: more arrays for the file (the cluster picture's `clusters` and `nearest` members)."""
  folder = os.path.join(workdir, FOLDER)
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"epoch_{epoch:04d}.npz")
  np.savez_compressed(path + ".tmp.npz", assignments=table, index=np.arange(table.shape[1], dtype=np.int32), **extra)
  os.replace(path + ".tmp.npz", path)
  if keep > 0:
    for old in sorted(f for f in os.listdir(folder) if f.startswith("epoch_"))[:-keep]:
      os.remove(os.path.join(folder, old))
  return path


def files(workdir: str) -> list[str]:
  """The saved tables, oldest epoch first."""
  return sorted(glob.glob(os.path.join(workdir, FOLDER, "epoch_*.npz")))


def load(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(assignments [heads, N], index [N]) of one saved table."""
  with np.load(path) as f:
    table = np.asarray(f["assignments"])
    index = np.asarray(f["index"]) if "index" in f else np.arange(table.shape[-1])
  return (table[None] if table.ndim == 1 else table), index


def load_nearest(path: str):
  """(clusters [C], nearest members [C, M]) saved with a table (log_cluster_images), or None."""
  with np.load(path) as f:
    return (np.asarray(f["clusters"]), np.asarray(f["nearest"])) if "nearest" in f else None
