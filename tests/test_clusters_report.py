"""clusters/report.py: ClusterReport.epoch writes the epoch's assignment table (read back with assignments.load) and
the cluster picture, warns when more than 20% of a head's clusters are empty, computes the stability NMI against the
table it kept from the previous epoch (sklearn as the reference), and writes no file where writes_files=False."""
import logging

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import normalized_mutual_info_score

from dcv2_jax.clusters import assignments, pictures
from dcv2_jax.clusters.report import ClusterReport

N = 60


class RecordingWriter:
  """Stands in for run.metric_writer.MetricWriter: records what it is given."""

  def __init__(self):
    self.records, self.images = [], []

  def write(self, record):
    self.records.append(record)

  def image(self, tag, image, step):
    self.images.append((tag, np.asarray(image), step))


def report(workdir, num_clusters=(6, 4), keep=0, draw=0, source=None, writes_files=True):
  return ClusterReport(str(workdir), num_clusters, keep, draw, None, source, RecordingWriter(), writes_files)


def table_and_sizes(rng, used, num_clusters, absent=5):
  """A k-means table [H, N] whose head h uses only clusters 0..used[h]-1 (-100 for `absent` samples), and the sizes
  [H, max K] k-means counts for it (zero-padded past each head's K)."""
  table = np.stack([rng.permutation(np.arange(N) % u) for u in used]).astype(np.int32)
  table[:, rng.choice(N, absent, replace=False)] = -100
  sizes = np.zeros((len(used), max(num_clusters)), np.int32)
  for h, row in enumerate(table):
    sizes[h] = np.bincount(row[row >= 0], minlength=max(num_clusters))
  return table, sizes


def test_the_epochs_table_is_written_and_read_back(tmp_path):
  rng = np.random.default_rng(0)
  table, sizes = table_and_sizes(rng, (6, 4), (6, 4))
  r = report(tmp_path)
  health = r.epoch(3, 30, table, sizes, kmeans_s=1.5)
  (path,) = assignments.files(str(tmp_path))
  assert path.endswith("epoch_0003.npz")
  got, index = assignments.load(path)
  np.testing.assert_array_equal(got, table)
  np.testing.assert_array_equal(index, np.arange(N))
  assert r.writer.records == [{"step": 30, "epoch": 3, "kmeans_s": 1.5, "clusters": health}]
  assert health["assigned"] == [N - 5, N - 5] and health["empty_clusters"] == [0, 0]
  assert "nmi_prev" not in health                           # no previous epoch yet
  assert r.writer.images == [] and not (tmp_path / pictures.FOLDER).exists()   # no picture asked for


def test_warns_when_more_than_a_fifth_of_a_heads_clusters_are_empty(tmp_path, caplog):
  """Head 0 fills 7 of its 10 clusters (30% empty: a warning), head 1 fills 4 of 5 (20%: none). Head 1's sizes are
  zero-padded to 10 columns, as k-means counts them for heads of unequal K: the padding is no empty cluster."""
  rng = np.random.default_rng(1)
  table, sizes = table_and_sizes(rng, (7, 4), (10, 5))
  r = report(tmp_path, num_clusters=(10, 5))
  with caplog.at_level(logging.WARNING):
    health = r.epoch(2, 20, table, sizes, kmeans_s=0.1)
  assert health["empty_clusters"] == [10 - 7, 5 - 4]
  warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
  assert len(warnings) == 1 and "head 0: 3 of 10 clusters are empty" in warnings[0]

  caplog.clear()
  table, sizes = table_and_sizes(rng, (8, 5), (10, 5))     # 20% and 0% empty: no warning
  with caplog.at_level(logging.WARNING):
    r.epoch(3, 30, table, sizes, kmeans_s=0.1)
  assert not [rec for rec in caplog.records if rec.levelno == logging.WARNING]


def test_nmi_to_the_previous_epochs_table(tmp_path):
  rng = np.random.default_rng(2)
  r = report(tmp_path, keep=2)
  tables = []
  for epoch in range(3):
    table, sizes = table_and_sizes(rng, (6, 4), (6, 4))
    if tables:                                           # related to last epoch's, not equal: NMI well inside (0, 1)
      keep = rng.random(N) < 0.6
      table = np.where(keep & (table >= 0) & (tables[-1] >= 0), tables[-1], table).astype(np.int32)
      sizes = np.stack([np.bincount(row[row >= 0], minlength=6) for row in table]).astype(np.int32)
    health = r.epoch(epoch, 10 * epoch, table, sizes, kmeans_s=0.1)
    if tables:
      prev = tables[-1]
      want = []
      for h in range(2):
        both = (table[h] >= 0) & (prev[h] >= 0)
        want.append(normalized_mutual_info_score(prev[h][both], table[h][both]))
      assert health["nmi_prev"] == pytest.approx(want, rel=1e-9)
      assert all(0.05 < x < 0.95 for x in want)
    tables.append(table)
    np.testing.assert_array_equal(r.previous, table)
  # keep_assignments=2: the newest two tables stay on disk.
  assert [p[-8:-4] for p in assignments.files(str(tmp_path))] == ["0001", "0002"]


def draw_inputs(rng):
  source = [{"image": rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)} for _ in range(N)]
  table, sizes = table_and_sizes(rng, (6, 4), (6, 4), absent=0)
  bank_index = rng.permutation(N)                          # bank rows in another order than the dataset's
  scores = (bank_index, table[0][bank_index], rng.normal(size=N))
  return source, table, sizes, scores


def nearest_reference(scores, sizes, count):
  """The `count` largest clusters of head 0 (ties: lower id) and their members by descending score."""
  index, assign, score = scores
  clusters = sorted(range(len(sizes)), key=lambda k: (-sizes[k], k))[:count]
  members = np.full((count, pictures.PER_CLUSTER), -1)
  for row, k in enumerate(clusters):
    best = [i for _, i in sorted(((-s, i) for i, a, s in zip(index, assign, score) if a == k))][:pictures.PER_CLUSTER]
    members[row, :len(best)] = best
  return np.array(clusters), members


def test_the_picture_of_the_largest_clusters(tmp_path):
  rng = np.random.default_rng(3)
  source, table, sizes, scores = draw_inputs(rng)
  r = report(tmp_path, draw=2, source=source)
  r.epoch(4, 40, table, sizes, kmeans_s=0.1, member_scores=scores)
  clusters, members = assignments.load_nearest(assignments.files(str(tmp_path))[0])
  want_clusters, want_members = nearest_reference(scores, sizes[0], 2)
  np.testing.assert_array_equal(clusters, want_clusters)
  np.testing.assert_array_equal(members, want_members)
  ((tag, image, step),) = r.writer.images
  assert tag == "clusters/nearest_to_centroid" and step == 40
  np.testing.assert_array_equal(image, pictures.grid(source, want_members))
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / pictures.FOLDER / "epoch_0004.png")), image)


def test_writes_no_file_where_another_process_writes(tmp_path):
  """writes_files=False (every process but 0): the same metrics, kept table and returned health; no assignment file,
  no picture, no image to the writer."""
  rng = np.random.default_rng(4)
  source, table, sizes, scores = draw_inputs(rng)
  r = report(tmp_path / "other", draw=2, source=source, writes_files=False)
  main = report(tmp_path / "main", draw=2, source=source)
  health = r.epoch(1, 10, table, sizes, kmeans_s=0.2, member_scores=scores)
  assert health == main.epoch(1, 10, table, sizes, kmeans_s=0.2, member_scores=scores)
  assert not (tmp_path / "other").exists()
  assert r.writer.images == [] and len(main.writer.images) == 1
  assert r.writer.records == main.writer.records == [{"step": 10, "epoch": 1, "kmeans_s": 0.2, "clusters": health}]
  np.testing.assert_array_equal(r.previous, table)
