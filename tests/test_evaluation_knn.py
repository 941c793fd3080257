"""evaluation/knn.py: weighted kNN against a float64 reference (chunked, padded, sharded over the 8-device mesh),
and its accuracy on separable and on random labels."""
import numpy as np

from dcv2_jax import evaluation as ev
from dcv2_jax import sharding as shd
from eval_helpers import _blobs


def _knn_reference(train, train_labels, test, num_classes, k, temperature):
  """Straightforward float64 weighted kNN."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  test = test / np.linalg.norm(test, axis=1, keepdims=True)
  sim = test.astype(np.float64) @ train.astype(np.float64).T
  idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
  votes = np.zeros((len(test), num_classes))
  for i in range(len(test)):
    np.add.at(votes[i], train_labels[idx[i]], np.exp(sim[i, idx[i]] / temperature))
  return votes.argmax(axis=1)


def test_knn_matches_float64_reference():
  rng = np.random.default_rng(0)
  train = rng.normal(size=(500, 16)).astype(np.float32)
  labels = rng.integers(0, 7, 500)
  test = rng.normal(size=(70, 16)).astype(np.float32)
  want = _knn_reference(train, labels, test, 7, k=20, temperature=0.07)
  # Chunks that divide neither side: test padding and the masked train padding + running top-k merge.
  got = ev.knn_classify(train, labels, test, 7, k=20, temperature=0.07, chunk=32, train_chunk=96)
  np.testing.assert_array_equal(got, want)
  one = ev.knn_classify(train, labels, test, 7, k=20, temperature=0.07)
  np.testing.assert_array_equal(one, want)
  # Train rows sharded over the 8 devices (500 rows -> 8 x 2 chunks of 32, the last shards padding).
  mesh = shd.make_mesh()
  sharded = ev.knn_classify(train, labels, test, 7, k=20, temperature=0.07, chunk=32, train_chunk=32,
                            mesh=mesh)
  np.testing.assert_array_equal(sharded, want)
  # k above the chunk size, and whole device shards of padding (20 rows over 8 devices x 3).
  for m in (None, mesh):
    np.testing.assert_array_equal(ev.knn_classify(train[:20], labels[:20], test, 7, k=20, temperature=0.1,
                                                  train_chunk=2, mesh=m),
                                  _knn_reference(train[:20], labels[:20], test, 7, 20, 0.1))
  # k larger than the train set is clamped; temperature is honoured.
  np.testing.assert_array_equal(ev.knn_classify(train[:10], labels[:10], test, 7, k=50, temperature=1.0),
                                _knn_reference(train[:10], labels[:10], test, 7, 10, 1.0))


def test_knn_separable_and_random_labels():
  rng = np.random.default_rng(1)
  x, y = _blobs(rng, 1200, 10, 32, 1.0)
  assert ev.knn_accuracy(x[:1000], y[:1000], x[1000:], y[1000:], 10) > 0.99
  r = rng.integers(0, 10, 1200)
  assert ev.knn_accuracy(x[:1000], r[:1000], x[1000:], r[1000:], 10) < 0.2   # chance is 0.1
