"""cluster_metrics against scikit-learn, incl. the -100 (absent) / -1 (unknown label) masking."""
import time

import numpy as np
import pytest
from sklearn import metrics as skm

from dcv2_jax.clusters import metrics as cm


def _correlated(rng, n, ka, kb, p_same=0.5):
  a = rng.integers(0, ka, n)
  b = np.where(rng.random(n) < p_same, a % kb, rng.integers(0, kb, n))
  return a, b


@pytest.mark.parametrize("n,ka,kb,p", [(3000, 50, 10, 0.5), (1000, 7, 7, 0.0), (500, 300, 40, 0.9),
                                       (200, 2, 1, 0.5)])
def test_nmi_ari_match_sklearn(n, ka, kb, p):
  rng = np.random.default_rng(n + ka)
  a, b = _correlated(rng, n, ka, kb, p)
  assert cm.nmi(a, b) == pytest.approx(skm.normalized_mutual_info_score(a, b), abs=1e-12)
  assert cm.adjusted_rand_index(a, b) == pytest.approx(skm.adjusted_rand_score(a, b), abs=1e-12)


def test_arbitrary_label_values_and_sorted_contingency(monkeypatch):
  """Negative / huge label values take the np.unique path; a tiny dense limit forces the sorted path."""
  rng = np.random.default_rng(1)
  a, b = _correlated(rng, 3000, 500, 500, 0.3)
  a2, b2 = a * 1_000_003 - 7, -b
  want_nmi = skm.normalized_mutual_info_score(a, b)
  want_ari = skm.adjusted_rand_score(a, b)
  assert cm.nmi(a2, b2) == pytest.approx(want_nmi, abs=1e-12)
  monkeypatch.setattr(cm, "_DENSE_CONTINGENCY_MAX", 0)
  assert cm.nmi(a, b) == pytest.approx(want_nmi, abs=1e-12)
  assert cm.adjusted_rand_index(a2, b2) == pytest.approx(want_ari, abs=1e-12)
  sk = skm.cluster.contingency_matrix(a, b)
  assert cm.purity(a, b) == pytest.approx(sk.max(axis=1).sum() / len(a))


def test_special_cases():
  one = np.zeros(10, int)
  assert cm.nmi(one, one) == 1.0 == skm.normalized_mutual_info_score(one, one)
  assert cm.nmi(one, np.arange(10)) == skm.normalized_mutual_info_score(one, np.arange(10))
  assert cm.adjusted_rand_index(one, np.arange(10)) == skm.adjusted_rand_score(one, np.arange(10))
  assert cm.adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
  assert np.isnan(cm.nmi([], [])) and np.isnan(cm.adjusted_rand_index([], [])) and np.isnan(cm.purity([], []))
  assert cm.purity([0, 0, 1, 1, 1], [3, 3, 3, 4, 4]) == pytest.approx(4 / 5)


def test_sizes_entropy_empty():
  a = np.array([0, 0, 1, 1, 3, 3, -100, -100])
  assert cm.empty_clusters(cm.cluster_sizes(a, 5)) == 2                        # clusters 2 and 4
  assert cm.cluster_size_entropy(cm.cluster_sizes(a, 5), normalized=False) == pytest.approx(np.log(3))
  assert cm.cluster_size_entropy(cm.cluster_sizes(a, 5)) == pytest.approx(np.log(3) / np.log(5))
  assert cm.cluster_size_entropy(cm.cluster_sizes(np.arange(6) % 3, 3)) == pytest.approx(1.0)


def test_cluster_health_masking_matches_sklearn():
  rng = np.random.default_rng(2)
  n, k = 4000, [30, 20]
  labels = rng.integers(0, 10, n)
  table = np.stack([np.where(rng.random(n) < 0.6, labels * 3 % 30, rng.integers(0, 30, n)),
                    rng.integers(0, 20, n)]).astype(np.int32)
  prev = np.where(rng.random((2, n)) < 0.7, table, rng.integers(0, 20, (2, n))).astype(np.int32)
  table[:, rng.random(n) < 0.1] = -100
  prev[:, rng.random(n) < 0.1] = -100
  table[1, :5] = 25                                          # ids >= K are ignored by size stats
  labels = np.where(rng.random(n) < 0.2, -1, labels)
  out = cm.cluster_health(table, k, prev_table=prev, labels=labels)
  for h in range(2):
    t = table[h]
    m = (t >= 0) & (labels >= 0)
    both = (t >= 0) & (prev[h] >= 0)
    assert out["nmi_labels"][h] == pytest.approx(skm.normalized_mutual_info_score(labels[m], t[m]), abs=1e-12)
    assert out["ari_labels"][h] == pytest.approx(skm.adjusted_rand_score(labels[m], t[m]), abs=1e-12)
    sk = skm.cluster.contingency_matrix(t[m], labels[m])
    assert out["purity_labels"][h] == pytest.approx(sk.max(axis=1).sum() / m.sum())
    assert out["nmi_prev"][h] == pytest.approx(skm.normalized_mutual_info_score(prev[h][both], t[both]),
                                               abs=1e-12)
    sizes = np.bincount(t[(t >= 0) & (t < k[h])], minlength=k[h])
    assert out["empty_clusters"][h] == int((sizes == 0).sum())
    assert out["assigned"][h] == sizes.sum()
  assert out["nmi_labels"][0] > 0.3 > out["nmi_labels"][1]
  import json
  json.dumps(out)                                            # plain Python numbers only


def test_cluster_health_imagenet_scale_is_fast():
  """1.28M samples, 3 heads x 3000 clusters, vs labels and the previous table: no dense N x K."""
  rng = np.random.default_rng(3)
  n, k = 1_281_167, 3000
  table = rng.integers(0, k, (3, n), dtype=np.int32)
  prev = rng.integers(0, k, (3, n), dtype=np.int32)
  table[:, :1000] = -100
  labels = rng.integers(0, 1000, n, dtype=np.int32)
  t0 = time.time()
  out = cm.cluster_health(table, k, prev_table=prev, labels=labels)
  assert time.time() - t0 < 20                               # ~1 s on 2 CPU cores
  assert out["assigned"] == [n - 1000] * 3
  # Independent tables: NMI is ~0.26, not 0, because K*K cells over N samples bias it upward.
  assert 0.0 < out["nmi_prev"][0] < 0.3


def test_cluster_health_takes_the_sizes_kmeans_counted():
  rng = np.random.default_rng(3)
  table = rng.integers(0, 6, (2, 500)).astype(np.int32)
  table[:, :20] = -100
  counted = np.stack([np.bincount(t[t >= 0], minlength=6) for t in table])
  assert cm.cluster_health(table, 6, sizes=counted) == cm.cluster_health(table, 6)
  given = cm.cluster_health(table, 6, sizes=np.array([[480, 0, 0, 0, 0, 0], counted[1]]))
  assert given["empty_clusters"] == [5, cm.cluster_health(table, 6)["empty_clusters"][1]]
