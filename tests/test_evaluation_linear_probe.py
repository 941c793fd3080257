"""evaluation/linear_probe.py: the quick probe (a Linear layer on pre-extracted features) learns separable
classes and not random labels, under the fast and the ImageNet protocols."""
import numpy as np

from dcv2_jax import evaluation as ev
from eval_helpers import _blobs


def test_linear_probe_separable_and_random_labels():
  rng = np.random.default_rng(2)
  x, y = _blobs(rng, 1200, 10, 32, 3.0)
  p = ev.fast_protocol()
  res = ev.linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], 10, p)
  assert res["accuracy"] > 0.98 and res["top5"] == 1.0 and res["final_loss"] < 0.2
  r = rng.integers(0, 10, 1200)
  res = ev.linear_probe(x[:1000], r[:1000], x[1000:], r[1000:], 10, p)
  assert res["accuracy"] < 0.2
  # The ImageNet protocol runs as well (raw features, lr 0.3); few epochs to stay fast.
  q = ev.linear_protocol()
  assert (q.epochs, q.lr, q.weight_decay, q.batch_size, q.standardize) == (100, 0.3, 1e-6, 256, False)
  q.epochs = 5
  res = ev.linear_probe(x[:1000] / 10, y[:1000], x[1000:] / 10, y[1000:], 10, q)
  assert res["accuracy"] > 0.95 and res["steps"] == 5 * 3
