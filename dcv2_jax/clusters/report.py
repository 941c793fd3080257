"""The trainer's report after each epoch's k-means: what the clusters look like, where it goes.

To metrics.jsonl / TensorBoard: k-means' time and the clusters' health per head (empty clusters, size entropy,
NMI to last epoch's assignments, NMI/ARI/purity against the labels when the data has them). To <workdir>: the
epoch's assignment table (assignments.py) and, with log_cluster_images, a picture of the largest clusters' members
nearest their centroid (pictures.py). To the log: one line, and a warning when a head has many empty clusters.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import logging

from dcv2_jax.clusters import assignments, metrics, pictures

# Warn when more than this share of a head's clusters is empty after k-means (K too large for the data).
EMPTY_CLUSTERS_WARNING = 0.2


@dataclasses.dataclass
class ClusterReport:
  """Built once per run; `epoch(...)` after every k-means. Holds last epoch's table (for the stability NMI)."""
  workdir: str
  num_clusters: tuple
  keep_assignments: int           # assignment files kept (0 = all)
  clusters_to_draw: int           # log_cluster_images: the largest clusters of head 0 in the picture (0 = none)
  labels: np.ndarray | None       # class labels by dataset index, if the data has them
  source: object                  # the training data (the picture's images)
  writer: object                  # run.metric_writer.MetricWriter
  writes_files: bool              # process 0 writes; every process computes
  previous: np.ndarray | None = None

  def epoch(self, epoch: int, step: int, table: np.ndarray, sizes: np.ndarray, kmeans_s: float,
            member_scores=None) -> dict:
    """Reports epoch's clustering: table [H, N] and sizes [H, K] from k-means, member_scores (dataset index,
    cluster, score of every bank row in head 0; kmeans.member_scores) when pictures are drawn. Returns the
    health metrics."""
    health = metrics.cluster_health(table, self.num_clusters, self.previous, self.labels, sizes=sizes)
    self.previous = table
    nearest = {}
    if self.clusters_to_draw and member_scores is not None:
      clusters, members = pictures.nearest_members(*member_scores, sizes=sizes[0][:self.num_clusters[0]],
                                                   count=self.clusters_to_draw, per_cluster=pictures.PER_CLUSTER)
      nearest = dict(clusters=clusters, nearest=members)
    if self.writes_files:
      try:
        assignments.save(self.workdir, epoch, table, self.keep_assignments, **nearest)
        if nearest:
          picture = pictures.grid(self.source, nearest["nearest"])
          pictures.save_png(picture, os.path.join(self.workdir, pictures.FOLDER, f"epoch_{epoch:04d}.png"))
          self.writer.image("clusters/nearest_to_centroid", picture, step)
      except OSError as e:    # outputs for inspection, not worth stopping for (a full disk fails the save next)
        logging.warning("could not write epoch %d's assignment table or cluster pictures to %s: %s", epoch,
                        self.workdir, e)
    for h, (empty, k) in enumerate(zip(health["empty_clusters"], self.num_clusters)):
      if empty > EMPTY_CLUSTERS_WARNING * k:
        logging.warning("epoch %d head %d: %d of %d clusters are empty: K is too large for these data? (lower "
                        "loss.num_clusters; docs/small_data.md)", epoch, h, empty, k)
    self.writer.write({"step": step, "epoch": epoch, "kmeans_s": kmeans_s, "clusters": health})
    logging.info("epoch %d k-means %.2fs: empty clusters %s, size entropy %s%s", epoch, kmeans_s,
                 health["empty_clusters"], [round(x, 3) for x in health["size_entropy"]],
                 f", NMI(labels) {[round(x, 3) for x in health['nmi_labels']]}" if "nmi_labels" in health else "")
    return health
