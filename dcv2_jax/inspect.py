"""Pictures of a run: its clusters and its curves.

    python -m dcv2_jax.inspect --workdir W                 # the newest epoch's clusters, and the curves
    python -m dcv2_jax.inspect --workdir W --epoch 10 --clusters 12 --out /tmp/look

Writes to --out (default <workdir>/inspect):
  clusters_epoch_XXXX.png  a few of the largest clusters of head 0 (one row each) x images: those nearest the
                           centroid where the run saved them (log_cluster_images), else random members
  curves.png               loss per step; kNN top-1 (eval_every_epochs) and NMI against the labels and against
                           the previous epoch's clusters, per epoch
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib
import numpy as np

from dcv2_jax import cli
from dcv2_jax.clusters import assignments
from dcv2_jax.clusters import metrics as cluster_metrics
from dcv2_jax.clusters import pictures as cluster_pictures
from dcv2_jax.data import sources

matplotlib.use("Agg")   # files only, no display
from matplotlib import pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top  (after the backend)


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} has no metrics.jsonl: is it a training workdir?")
  records = []
  for line in open(path):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:        # a line cut short by a crash
      pass
  return records


def cluster_grid(workdir: str, data_cfg, epoch: int | None, num_clusters: int, per_cluster: int):
  """(epoch, grid image, how the members were chosen) of a saved assignment table."""
  files = assignments.files(workdir)
  if not files:
    raise FileNotFoundError(f"{workdir} has no assignment tables (assignments/epoch_*.npz)")
  if epoch is not None:
    files = [f for f in files if os.path.basename(f) == f"epoch_{epoch:04d}.npz"]
    if not files:
      raise FileNotFoundError(f"{workdir} has no assignment table of epoch {epoch} (kept: keep_assignments)")
  path = files[-1]
  table, _ = assignments.load(path)
  saved = assignments.load_nearest(path)
  if saved is not None:
    members, how = saved[1][:num_clusters, :per_cluster], "nearest their centroid"
  else:
    sizes = cluster_metrics.cluster_sizes(table[0], int(table[0].max()) + 1)
    members, how = cluster_pictures.random_members(table[0], sizes, num_clusters, per_cluster)[1], "random members"
  image = cluster_pictures.grid(sources.make_source(data_cfg), members)
  return int(os.path.basename(path)[len("epoch_"):-len(".npz")]), image, how


def curves(records: list[dict], path: str) -> None:
  steps = [(r["step"], r["loss"]) for r in records if "loss" in r and "epoch_loss" not in r]
  knn = [(r["epoch"], r["knn_top1"]) for r in records if "knn_top1" in r]
  health = [(r["epoch"], r["clusters"]) for r in records if "clusters" in r]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  if steps:
    axes[0].plot(*zip(*steps))
  axes[0].set(title="DCv2 loss", xlabel="step")
  if knn:
    axes[1].plot(*zip(*knn), marker="o")
  else:
    axes[1].text(0.5, 0.5, "no kNN curve (eval_every_epochs)", ha="center", transform=axes[1].transAxes)
  axes[1].set(title="kNN top-1", xlabel="epoch")
  for key, label in (("nmi_labels", "NMI vs labels"), ("nmi_prev", "NMI vs last epoch")):
    points = [(e, float(np.mean(h[key]))) for e, h in health if key in h]
    if points:
      axes[2].plot(*zip(*points), marker="o", label=label)
      axes[2].legend(loc="lower right")
  axes[2].set(title="cluster NMI (mean over heads)", xlabel="epoch")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


@cli.one_line_errors
def main(argv=None) -> dict:
  p = argparse.ArgumentParser(prog="python -m dcv2_jax.inspect", description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a training workdir")
  p.add_argument("--epoch", type=int, help="the epoch whose clusters to draw (default: the newest saved)")
  p.add_argument("--clusters", type=int, default=8, help="clusters to draw (the largest)")
  p.add_argument("--per_cluster", type=int, default=cluster_pictures.PER_CLUSTER, help="images per cluster")
  p.add_argument("--out", help="output folder (default: <workdir>/inspect)")
  args = p.parse_args(argv)
  if not os.path.isdir(args.workdir):
    raise FileNotFoundError(f"{args.workdir} does not exist")
  cfg = cli.run_config(argparse.Namespace(config=None, workdir=args.workdir))
  out = args.out or os.path.join(args.workdir, "inspect")
  os.makedirs(out, exist_ok=True)
  epoch, image, how = cluster_grid(args.workdir, cfg.data, args.epoch, args.clusters, args.per_cluster)
  written = {"clusters": os.path.join(out, f"clusters_epoch_{epoch:04d}.png"), "curves": os.path.join(out, "curves.png")}
  cluster_pictures.save_png(image, written["clusters"])
  curves(read_metrics(args.workdir), written["curves"])
  print(f"wrote {written['clusters']} (epoch {epoch}, {how}) and {written['curves']}")
  return written


if __name__ == "__main__":
  main(sys.argv[1:])
