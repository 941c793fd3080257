"""lloyd against a float64 numpy reference; sharded bank equals one device; cluster_heads over the memory bank."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dcv2_jax import kmeans, kmeans_kernel, memory_bank
from dcv2_jax.kmeans import KMeansSettings
from dcv2_jax.sharding import make_mesh
from kmeans_helpers import blobs, unit


def reference_lloyd(bank, cents, iters, valid):
  bank, cents = bank.astype(np.float64), cents.astype(np.float64).copy()
  for it in range(iters + 1):
    a = np.argmax(bank @ cents.T, axis=1)
    a[~valid] = -100
    if it == iters:
      return cents, a
    for k in range(len(cents)):
      members = bank[a == k]
      if len(members):
        s = members.sum(0)
        cents[k] = s / np.linalg.norm(s)


@pytest.mark.parametrize("chunk,sums,assign", [(7, "scatter", "xla"), (64, "scatter", "xla"),
                                               (1000, "scatter", "xla"), (64, "onehot", "xla"),
                                               (64, "scatter", "pallas")])
def test_lloyd_matches_reference_with_padding(chunk, sums, assign):
  rng = np.random.default_rng(0)
  bank = np.abs(blobs(rng, 200, 8, 6))      # positive orthant: a negative centroid wins no row
  valid = rng.random(200) > 0.2
  init = bank[np.flatnonzero(valid)[:10]]
  # Far-away initial centroid: nothing is assigned to it -> empty cluster must keep it.
  init[3] = -unit(np.ones(8))
  got_c, got_a = kmeans.lloyd(jnp.asarray(bank), jnp.asarray(init), 5, jnp.asarray(valid),
                              KMeansSettings(chunk_size=chunk, sums=sums, assign=assign))
  ref_c, ref_a = reference_lloyd(bank, init, 5, valid)
  np.testing.assert_array_equal(np.asarray(got_a), ref_a)
  np.testing.assert_allclose(np.asarray(got_c), ref_c, atol=1e-5)
  assert np.all(np.asarray(got_a)[~valid] == -100)
  assert not np.any(np.asarray(got_a) == 3)                       # empty ...
  np.testing.assert_allclose(np.asarray(got_c)[3], init[3], atol=1e-6)   # ... kept its centroid


def test_zero_iters_is_one_assignment():
  rng = np.random.default_rng(1)
  bank = blobs(rng, 50, 4, 3)
  c, a = kmeans.lloyd(jnp.asarray(bank), jnp.asarray(bank[:3]), 0)
  np.testing.assert_array_equal(np.asarray(c), bank[:3])
  np.testing.assert_array_equal(np.asarray(a), np.argmax(bank @ bank[:3].T, 1))


def test_reseed_fills_empty_clusters():
  rng = np.random.default_rng(2)
  bank = np.abs(blobs(rng, 300, 8, 5))
  init = bank[:8].copy()
  init[5:] = -unit(np.ones(8))                                 # three identical far-away centroids
  _, a_keep = kmeans.lloyd(jnp.asarray(bank), jnp.asarray(init), 4)
  c, a = kmeans.lloyd(jnp.asarray(bank), jnp.asarray(init), 4, settings=KMeansSettings(empty_clusters="reseed"))
  sizes_keep = np.bincount(np.asarray(a_keep), minlength=8)
  sizes = np.bincount(np.asarray(a), minlength=8)
  assert (sizes_keep == 0).sum() >= 2
  assert (sizes == 0).sum() < (sizes_keep == 0).sum()
  np.testing.assert_allclose(np.linalg.norm(np.asarray(c), axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("sums,assign", [("scatter", "xla"), ("onehot", "xla"), ("scatter", "pallas")])
def test_sharded_bank_equals_single_device(sums, assign):
  rng = np.random.default_rng(3)
  bank = blobs(rng, 8 * 40, 16, 12)
  valid = rng.random(320) > 0.1
  init = bank[:12]
  mesh = make_mesh()
  sharded = jax.device_put(bank, NamedSharding(mesh, P("data", None)))
  sv = jax.device_put(valid, NamedSharding(mesh, P("data")))
  settings = KMeansSettings(chunk_size=16, sums=sums, assign=assign)
  c8, a8 = kmeans.lloyd(sharded, jnp.asarray(init), 6, sv, settings, mesh=mesh)
  one = jax.devices()[0]
  c1, a1 = kmeans.lloyd(jax.device_put(bank, one), jax.device_put(init, one), 6, jax.device_put(valid, one),
                        KMeansSettings(chunk_size=16, sums=sums))
  np.testing.assert_array_equal(np.asarray(a8), np.asarray(a1))
  np.testing.assert_allclose(np.asarray(c8), np.asarray(c1), atol=1e-5)
  assert len(c8.sharding.device_set) == 8
  # Rows never leave their device: no all-gather or all-to-all in the compiled program, only the
  # all-reduce of the [K, D] sums (and of the counts).
  hlo = kmeans.lloyd.lower(sharded, jnp.asarray(init), 6, sv, settings, mesh=mesh).compile().as_text()
  assert "all-gather" not in hlo and "all-to-all" not in hlo and "all-reduce" in hlo


def test_init_centroids_valid_distinct_and_deterministic():
  rng = np.random.default_rng(4)
  bank = jnp.asarray(unit(rng.normal(size=(100, 4))), jnp.float32)
  valid = jnp.asarray(np.arange(100) % 3 == 0)
  a = kmeans.init_centroids(jax.random.key(7), bank, 20, valid)
  b = kmeans.init_centroids(jax.random.key(7), bank, 20, valid)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rows = [int(np.argmax(np.all(np.isclose(np.asarray(bank), r), axis=1))) for r in np.asarray(a)]
  assert len(set(rows)) == 20 and all(r % 3 == 0 for r in rows)


def test_cluster_all_heads():
  rng = np.random.default_rng(5)
  steps, b, d = 4, 16, 8
  bank = memory_bank.create(2, steps, b, d)
  for s in range(steps):
    bank = memory_bank.write(bank, s, jnp.asarray(np.stack([blobs(rng, b, d, 3)] * 2)),
                             jnp.arange(s * b, (s + 1) * b))
  cents, table, sizes = kmeans.cluster_heads(jax.random.key(0), bank, (5, 5, 5), 3, 70, KMeansSettings(chunk_size=16))
  assert cents.shape == (3, 5, d) and table.shape == (3, 70)
  t = np.asarray(table)
  assert np.all(t[:, 64:] == -100) and np.all((t[:, :64] >= 0) & (t[:, :64] < 5))
  np.testing.assert_array_equal(np.asarray(sizes), np.stack([np.bincount(t[h, :64], minlength=5) for h in range(3)]))


def test_bfloat16_kmeans_close_to_float32():
  rng = np.random.default_rng(6)
  bank = blobs(rng, 512, 16, 8)
  init = bank[:8]
  c32, a32 = kmeans.lloyd(jnp.asarray(bank), jnp.asarray(init), 5)
  c16, a16 = kmeans.lloyd(jnp.asarray(bank), jnp.asarray(init), 5, settings=KMeansSettings(dtype="bfloat16"))
  assert c16.dtype == jnp.float32
  assert (np.asarray(a32) == np.asarray(a16)).mean() > 0.97      # only near-ties may flip
  np.testing.assert_allclose(np.asarray(c16), np.asarray(c32), atol=0.05)


def test_cluster_ignores_non_finite_rows():
  rng = np.random.default_rng(7)
  bank = memory_bank.create(1, 2, 16, 8)
  for s in range(2):
    z = blobs(rng, 16, 8, 3)
    if s == 1:
      z[3] = np.nan
    bank = memory_bank.write(bank, s, jnp.asarray(z[None]), jnp.arange(s * 16, (s + 1) * 16))
  cents, table, _ = kmeans.cluster_heads(jax.random.key(0), bank, (4,), 3, 32)
  assert np.all(np.isfinite(np.asarray(cents)))
  t = np.asarray(table)[0]
  assert t[19] == -100 and np.all(np.delete(t, 19) >= 0)


def test_pallas_falls_back_to_xla_where_the_kernel_cannot_run(monkeypatch, caplog):
  """A JAX without Pallas' Triton backend (deprecated in JAX 0.11): loss.kmeans_assign=pallas warns once and
  runs the XLA assignment, with the same result."""
  rng = np.random.default_rng(12)
  bank = blobs(rng, 96, 8, 4)
  init = bank[:5]
  want = kmeans.lloyd(jnp.asarray(bank), jnp.asarray(init), 3, settings=KMeansSettings(assign="xla"))
  monkeypatch.setattr(kmeans_kernel, "unavailable_reason", lambda platform=None: "this JAX has no Pallas Triton backend")
  monkeypatch.setattr(kmeans_kernel, "nearest", lambda *a, **k: pytest.fail("the fused kernel was called"))
  kmeans._warn_no_fused_kernel.cache_clear()
  with caplog.at_level("WARNING"):
    got = kmeans.lloyd(jnp.asarray(bank), jnp.asarray(init), 3, settings=KMeansSettings(assign="pallas", chunk_size=48))
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=1e-6)
  warnings = [r for r in caplog.records if "no Pallas Triton backend" in r.getMessage()]
  assert len(warnings) == 1 and "loss.kmeans_assign=xla" in warnings[0].getMessage()


def test_heads_of_unequal_clusters_pad_centroids_and_sizes():
  rng = np.random.default_rng(13)
  steps, b, d = 4, 16, 8
  bank = memory_bank.create(2, steps, b, d)
  for s in range(steps):
    bank = memory_bank.write(bank, s, jnp.asarray(np.stack([blobs(rng, b, d, 5)] * 2)), jnp.arange(s * b, (s + 1) * b))
  ks = (7, 4, 2)
  cents, table, sizes = kmeans.cluster_heads(jax.random.key(0), bank, ks, 3, 64, KMeansSettings(chunk_size=16))
  t, sizes, cents = np.asarray(table), np.asarray(sizes), np.asarray(cents)
  assert cents.shape == (3, 7, d) and sizes.shape == (3, 7)
  for h, k in enumerate(ks):
    assert t[h].max() < k and t[h].min() >= 0                   # never a padded cluster
    np.testing.assert_array_equal(sizes[h], np.bincount(t[h], minlength=7))
    assert np.all(cents[h, k:] == 0) and np.allclose(np.linalg.norm(cents[h, :k], axis=1), 1, atol=1e-5)


def test_matmul_precision_reaches_every_score_of_kmeans():
  """loss.kmeans_precision=highest: every dot of Lloyd's assignment and sums carries HIGHEST (true float32 on
  GPUs, which otherwise use TF32); default leaves the choice to the backend."""
  bank = jnp.asarray(blobs(np.random.default_rng(14), 64, 8, 3))
  text = lambda p: kmeans.lloyd.lower(bank, bank[:3], 2, None, KMeansSettings(precision=p, sums="onehot")).as_text()
  highest = text(jax.lax.Precision.HIGHEST)
  assert highest.count("dot_general") >= 2
  assert highest.count("dot_general") == highest.count("precision = [HIGHEST, HIGHEST]")
  assert "HIGHEST" not in text(None)
