"""What the evaluation tests share: labelled Gaussian blobs, a tiny stand-in trunk, and stand-ins for
load_trunk / eval_batches (digits as uint8 RGB batches, the last one padded)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

from dcv2_jax.config import base_config

NORM = dict(mean=(0.485, 0.456, 0.406), std=(0.228, 0.224, 0.225))


def _blobs(rng, n, num_classes, dim, spread):
  centers = rng.normal(size=(num_classes, dim)) * 5
  labels = rng.integers(0, num_classes, n)
  return (centers[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32), labels


class TinyNet(nn.Module):
  """Stand-in trunk: conv + BN (eval mode) + global average pool -> [b, 8]."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), padding=1)(x)
    x = nn.BatchNorm(use_running_average=True)(x)
    return jnp.mean(nn.relu(x), axis=(1, 2))


def _tiny_trunk(size=8, seed=0):
  net = TinyNet()
  variables = net.init(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 3)))
  return (lambda v, x: net.apply(v, x)), variables


def _digits_split(split):
  d = load_digits()
  perm = np.random.default_rng(0).permutation(len(d.target))
  rows = perm[:1437] if split == "train" else perm[1437:]
  return d.images[rows], d.target[rows], rows


def _fake_eval_batches(data_cfg, split, batch_size, image_size, process_index=None, process_count=None, **view):
  """Stand-in for dcv2_jax.data.eval_batches: digits as uint8 RGB, padded last batch."""
  images, labels, rows = _digits_split(split)
  images = np.repeat((images * 255 / 16).astype(np.uint8)[..., None], 3, axis=-1)
  reps = image_size // 8
  images = images.repeat(reps, axis=1).repeat(reps, axis=2)
  for s in range(0, len(labels), batch_size):
    n = len(labels[s:s + batch_size])
    pad = batch_size - n
    yield dict(image=np.pad(images[s:s + n], ((0, pad), (0, 0), (0, 0), (0, 0))),
               label=np.pad(labels[s:s + n], (0, pad)).astype(np.int32),
               index=np.pad(rows[s:s + n], (0, pad)).astype(np.int32),
               valid=np.arange(batch_size) < n)


def _digits_cfg():
  cfg = base_config()
  cfg.data.source, cfg.data.split, cfg.data.eval_split = "digits", "train", "test"
  cfg.data.image_size_digits = 16
  cfg.data.crops = ((16, 2, 0.5, 1.0),)                      # so evaluation sees 16 px images
  cfg.data.num_workers = 0                                   # no grain worker processes in tests
  cfg.loss.num_clusters = (10, 10)
  return cfg
