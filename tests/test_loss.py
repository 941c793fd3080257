"""dcv2_loss against an independent float64 numpy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcv2_jax.loss import dcv2_loss


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference(z, c, t, temp):
  z, c = z.astype(np.float64), c.astype(np.float64)
  heads = []
  for h in range(c.shape[0]):
    total, n = 0.0, 0
    for crop in range(z.shape[0]):
      for b in range(z.shape[1]):
        if t[h, b] == -100:
          continue
        logits = c[h] @ z[crop, b] / temp
        m = logits.max()
        total += m + np.log(np.exp(logits - m).sum()) - logits[t[h, b]]
        n += 1
    heads.append(total / n if n else 0.0)
  return np.mean(heads)


@pytest.mark.parametrize("ignore_frac", [0.0, 0.4])
def test_loss_matches_float64_reference(ignore_frac):
  rng = np.random.default_rng(0)
  C, B, D, H, K = 3, 7, 16, 3, 11
  z = unit(rng.normal(size=(C, B, D))).astype(np.float32)
  c = unit(rng.normal(size=(H, K, D))).astype(np.float32)
  t = rng.integers(0, K, size=(H, B))
  t[rng.random((H, B)) < ignore_frac] = -100
  got = dcv2_loss(jnp.asarray(z), jnp.asarray(c), jnp.asarray(t), 0.1)
  np.testing.assert_allclose(float(got), reference(z, c, t, 0.1), rtol=1e-5)


def test_all_ignored_gives_zero_and_zero_grad():
  rng = np.random.default_rng(1)
  z = jnp.asarray(unit(rng.normal(size=(2, 4, 8))), jnp.float32)
  c = jnp.asarray(unit(rng.normal(size=(2, 5, 8))), jnp.float32)
  t = jnp.full((2, 4), -100)
  loss, grad = jax.value_and_grad(dcv2_loss)(z, c, t, 0.1)
  assert float(loss) == 0.0
  assert np.all(np.asarray(grad) == 0) and np.all(np.isfinite(np.asarray(grad)))


def test_one_head_all_ignored_others_count():
  rng = np.random.default_rng(2)
  z = unit(rng.normal(size=(2, 5, 8))).astype(np.float32)
  c = unit(rng.normal(size=(2, 6, 8))).astype(np.float32)
  t = rng.integers(0, 6, size=(2, 5))
  t[1] = -100
  got = dcv2_loss(jnp.asarray(z), jnp.asarray(c), jnp.asarray(t), 0.2)
  np.testing.assert_allclose(float(got), reference(z, c, t, 0.2), rtol=1e-5)
  # head 1 contributes 0 to the mean over heads
  np.testing.assert_allclose(float(got), reference(z, c[:1], t[:1], 0.2) / 2, rtol=1e-5)


def test_accuracy():
  rng = np.random.default_rng(3)
  z = unit(rng.normal(size=(2, 6, 8))).astype(np.float32)
  c = unit(rng.normal(size=(1, 4, 8))).astype(np.float32)
  pred = np.argmax(np.einsum("cbd,kd->cbk", z, c[0]), -1)
  t = pred[0][None].copy()                 # crop 0 always right; crop 1 right where it agrees
  t[0, 0] = -100
  _, acc = dcv2_loss(jnp.asarray(z), jnp.asarray(c), jnp.asarray(t), 0.1, return_accuracy=True)
  expect = (5 + (pred[1, 1:] == pred[0, 1:]).sum()) / 10
  np.testing.assert_allclose(float(acc[0]), expect, rtol=1e-6)


def test_heads_of_unequal_clusters_match_a_float64_reference_per_head():
  """num_clusters=(11, 6, 3) in centroids padded to 11: each head's loss is its own K's softmax, and no padded
  cluster wins the argmax even where its (padding) centroid scores highest."""
  rng = np.random.default_rng(3)
  C, B, D, ks = 2, 9, 16, (11, 6, 3)
  z = unit(rng.normal(size=(C, B, D))).astype(np.float32)
  c = np.zeros((3, 11, D), np.float32)
  for h, k in enumerate(ks):
    c[h, :k] = unit(rng.normal(size=(k, D)))
  c[1, 6:] = z[0].mean(0) * 10          # padding that would outscore every real cluster if it were not masked
  t = np.stack([rng.integers(0, k, size=B) for k in ks])
  t[2, :2] = -100
  want = np.mean([reference(z, c[h:h + 1, :k], t[h:h + 1], 0.1) for h, k in enumerate(ks)])
  got, acc = dcv2_loss(jnp.asarray(z), jnp.asarray(c), jnp.asarray(t), 0.1, return_accuracy=True, num_clusters=ks)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  for h, k in enumerate(ks):
    scores = np.einsum("cbd,kd->cbk", z, c[h, :k])
    ok = t[h] != -100
    want_acc = (scores.argmax(-1) == t[h])[:, ok].mean()
    assert float(acc[h]) == pytest.approx(want_acc)
  grad = jax.grad(lambda z: dcv2_loss(z, jnp.asarray(c), jnp.asarray(t), 0.1, num_clusters=ks))(jnp.asarray(z))
  assert np.all(np.isfinite(np.asarray(grad)))
