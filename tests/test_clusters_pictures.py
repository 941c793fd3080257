"""The cluster pictures: the chosen members are the nearest to their centroid (against numpy), and the grid."""
import numpy as np

from dcv2_jax.clusters import pictures as cluster_pictures


def test_nearest_members_are_the_largest_clusters_best_scores():
  rng = np.random.default_rng(0)
  n = 300
  index = rng.permutation(1000)[:n]
  index[:7] = -1                                              # empty slots
  assignment = rng.integers(0, 6, n)
  assignment[:7] = -100
  score = rng.normal(size=n)
  sizes = np.bincount(assignment[assignment >= 0], minlength=6)
  clusters, members = cluster_pictures.nearest_members(index, assignment, score, sizes, 3, 5)
  assert clusters.tolist() == np.argsort(-sizes, kind="stable")[:3].tolist()
  for k, row in zip(clusters, members):
    mine = [(s, i) for i, a, s in zip(index, assignment, score) if a == k and i >= 0]
    assert row.tolist() == [i for _, i in sorted(mine, reverse=True)[:5]]


def test_grid_layout_and_missing_members():
  images = [{"image": np.full((10, 12, 3), 40 * i, np.uint8)} for i in range(4)]
  members = np.array([[0, 1, -1], [3, 2, 2]])
  g = cluster_pictures.grid(images, members, thumb=8)
  assert g.shape == (2 * 10 + 2, 3 * 10 + 2, 3)
  assert (g[2:10, 2:10] == 0).all() and (g[2:10, 12:20] == 40).all() and (g[2:10, 22:30] == 128).all()
  assert (g[12:20, 2:10] == 120).all()
