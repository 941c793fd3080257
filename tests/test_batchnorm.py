"""Grouped (SyncBN-style) BatchNorm on 8 devices against hand-computed group statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dcv2_jax.batchnorm import BatchNorm
from dcv2_jax.models import bn_groups_for
from dcv2_jax.sharding import make_mesh


@pytest.mark.parametrize("group_size", [0, 2, 4])
def test_group_statistics_on_8_devices(group_size):
  mesh = make_mesh()
  groups = bn_groups_for(group_size, 8, 8)
  rng = np.random.default_rng(group_size)
  # Per-device offsets make the groups' statistics differ a lot.
  x = (rng.normal(size=(32, 3, 3, 5)) * 2 + np.repeat(np.arange(8), 4)[:, None, None, None]).astype(np.float32)
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  bn = BatchNorm(use_running_average=False, num_groups=groups, momentum=0.9)
  variables = bn.init(jax.random.key(0), xs)
  variables = {"params": {"scale": jnp.full(5, 1.5), "bias": jnp.full(5, 0.25)},
               "batch_stats": variables["batch_stats"]}
  y, upd = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))(variables, xs)

  size = 32 // groups
  ref = np.empty_like(x, dtype=np.float64)
  means, vars_unbiased = [], []
  for g in range(groups):
    part = x[g * size:(g + 1) * size].astype(np.float64)
    m = part.mean((0, 1, 2))
    v = part.var((0, 1, 2))
    ref[g * size:(g + 1) * size] = (part - m) / np.sqrt(v + 1e-5) * 1.5 + 0.25
    n = part.size // 5
    means.append(m)
    vars_unbiased.append(v * n / (n - 1))
  np.testing.assert_allclose(np.asarray(y), ref, atol=2e-5)
  np.testing.assert_allclose(np.asarray(upd["batch_stats"]["mean"]), 0.1 * np.mean(means, 0), atol=1e-5)
  np.testing.assert_allclose(np.asarray(upd["batch_stats"]["var"]), 0.9 + 0.1 * np.mean(vars_unbiased, 0),
                             rtol=1e-5)


def test_eval_mode_uses_running_stats():
  bn = BatchNorm(use_running_average=True)
  x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
  v = {"params": {"scale": jnp.asarray([1.0, 2.0, 3.0]), "bias": jnp.asarray([0.0, 1.0, -1.0])},
       "batch_stats": {"mean": jnp.asarray([0.5, -0.5, 0.0]), "var": jnp.asarray([4.0, 1.0, 0.25])}}
  y = bn.apply(v, x)
  ref = (x - [0.5, -0.5, 0.0]) / np.sqrt(np.asarray([4.0, 1.0, 0.25]) + 1e-5) * [1, 2, 3] + [0, 1, -1]
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5)


def test_bad_group_size_message():
  with pytest.raises(ValueError, match="group_size=3"):
    bn_groups_for(3, 8, 8)
  assert bn_groups_for(-1, 16, 8) == 2 and bn_groups_for(0, 16, 8) == 1 and bn_groups_for(4, 16, 8) == 4
