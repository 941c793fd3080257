"""What the k-means tests share: unit rows, and rows drawn around random unit centres."""
import numpy as np


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def blobs(rng, n, d, k):
  centers = unit(rng.normal(size=(k, d)))
  return unit(centers[rng.integers(0, k, n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)
