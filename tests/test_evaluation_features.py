"""evaluation/features.py: features extracted on the 8-device mesh equal one device's, padding rows dropped."""
import jax
import numpy as np

from dcv2_jax import evaluation as ev
from dcv2_jax import sharding as shd
from eval_helpers import _tiny_trunk


def test_extract_features_sharded_matches_unsharded_and_drops_padding():
  apply_fn, variables = _tiny_trunk()
  rng = np.random.default_rng(3)
  sizes = [16, 16, 12]                                        # 12: not a multiple of the 8 devices
  batches, want_rows = [], []
  start = 0
  for b in sizes:
    valid = np.ones(b, bool)
    if b == 12:
      valid[9:] = False                                       # a padded tail, as eval_batches makes
    batches.append(dict(image=rng.integers(0, 256, (b, 8, 8, 3), dtype=np.uint8),
                        label=rng.integers(0, 5, b).astype(np.int32),
                        index=np.arange(start, start + b, dtype=np.int32), valid=valid))
    start += b
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  mesh = shd.make_mesh()
  assert mesh.devices.size == 8
  feats, labels, index = ev.extract_features(apply_fn, variables, iter(batches), mesh, mean=mean, std=std,
                                             progress=False)
  images = np.concatenate([b["image"][b["valid"]] for b in batches])
  x = (images.astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std)
  dev = jax.devices()[0]
  want = np.asarray(jax.jit(apply_fn)(jax.device_put(variables, dev), jax.device_put(x, dev)))
  assert feats.shape == (16 + 16 + 9, 8) and feats.dtype == np.float32
  np.testing.assert_allclose(feats, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(labels, np.concatenate([b["label"][b["valid"]] for b in batches]))
  np.testing.assert_array_equal(index, np.concatenate([b["index"][b["valid"]] for b in batches]))
