"""Pictures of the clusters: for a few clusters of head 0, the images nearest their centroid, as one grid.

The trainer (log_cluster_images) draws it every epoch from the memory bank right after k-means, to TensorBoard
and <workdir>/clusters/epoch_XXXX.png, and keeps the chosen samples in that epoch's assignment file so that
`python -m dcv2_jax.inspect` can draw the same grid later.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

FOLDER = "clusters"  # <workdir>/clusters/epoch_XXXX.png
PER_CLUSTER = 8      # images per cluster (a grid row)
THUMB = 48           # pixels per image in the grid
GAP = 2


def largest_clusters(sizes, count: int) -> np.ndarray:
  """The ids of the `count` largest clusters, largest first (ties: the lower id)."""
  return np.argsort(-np.asarray(sizes), kind="stable")[:count]


def nearest_members(index, assignment, score, sizes, count: int, per_cluster: int):
  """(clusters [C], members [C, per_cluster]) of the C largest clusters: the dataset indices of their members
  with the highest score against the centroid (-1 where a cluster has fewer members).

  index, assignment, score: [N] per bank row (dataset index, -1 empty; cluster, -100 absent; <z, centroid>).
  """
  index, assignment, score = (np.asarray(x) for x in (index, assignment, score))
  clusters = largest_clusters(sizes, count)
  members = np.full((len(clusters), per_cluster), -1, np.int64)
  ok = (index >= 0) & (assignment >= 0)
  for row, k in enumerate(clusters):
    mine = np.flatnonzero(ok & (assignment == k))
    best = mine[np.argsort(-score[mine], kind="stable")[:per_cluster]]
    members[row, :len(best)] = index[best]
  return clusters, members


def random_members(table_row, sizes, count: int, per_cluster: int, seed: int = 0):
  """Like nearest_members without the centroids (a saved table alone): random members of the largest clusters."""
  rng = np.random.default_rng(seed)
  clusters = largest_clusters(sizes, count)
  members = np.full((len(clusters), per_cluster), -1, np.int64)
  for row, k in enumerate(clusters):
    mine = np.flatnonzero(np.asarray(table_row) == k)
    pick = rng.choice(mine, min(per_cluster, len(mine)), replace=False) if len(mine) else mine
    members[row, :len(pick)] = np.sort(pick)
  return clusters, members


def grid(source, members, thumb: int = THUMB) -> np.ndarray:
  """uint8 [H, W, 3]: one row per cluster, its members' images as thumb x thumb tiles (grey where none or
  undecodable)."""
  rows, cols = members.shape
  out = np.full((rows * (thumb + GAP) + GAP, cols * (thumb + GAP) + GAP, 3), 255, np.uint8)
  for r in range(rows):
    for c in range(cols):
      y, x = GAP + r * (thumb + GAP), GAP + c * (thumb + GAP)
      tile = np.full((thumb, thumb, 3), 128, np.uint8)
      if members[r, c] >= 0:
        try:
          tile = np.asarray(Image.fromarray(source[int(members[r, c])]["image"]).resize((thumb, thumb),
                                                                                        Image.BILINEAR))
        except Exception:  # pylint: disable=broad-except  (an undecodable file: a grey tile)
          pass
      out[y:y + thumb, x:x + thumb] = tile
  return out


def save_png(image: np.ndarray, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(image).save(path)
