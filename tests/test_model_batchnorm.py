"""Grouped (SyncBN-style) BatchNorm on 8 devices against hand-computed group statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dcv2_jax import config as config_lib
from dcv2_jax.model.batchnorm import BatchNorm, num_groups
from dcv2_jax.sharding import make_mesh


def sync_bn(group_size=0, samples=0):
  c = config_lib.base_config().model.sync_bn
  c.group_size, c.samples = group_size, samples
  return c


@pytest.mark.parametrize("group_size", [0, 2, 4])
def test_group_statistics_on_8_devices(group_size):
  mesh = make_mesh()
  groups = num_groups(sync_bn(group_size=group_size), 32, 8, 8)
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
  c = config_lib.base_config()
  c.model.sync_bn.group_size = 3
  with pytest.raises(ValueError, match="group_size=3"):
    config_lib.validate(c, 10000, 2, num_devices=8, num_processes=1)
  assert (num_groups(sync_bn(group_size=-1), 64, 16, 8), num_groups(sync_bn(group_size=0), 64, 16, 8),
          num_groups(sync_bn(group_size=4), 64, 16, 8)) == (2, 1, 4)


@pytest.mark.torch
@pytest.mark.parametrize("std,running_mean,atol", [
    (0.01, [99.99, -50.01, 3.0], 2e-3),     # |mean|/std 1e4, running mean near the batch mean (trained)
    (10.0, [0.0, 0.0, 0.0], 1e-4)])         # |mean|/std 10, running mean 0 (the first steps)
def test_one_pass_statistics_with_large_means_and_gradient_match_torch(std, running_mean, atol):
  """Both moments come from one pass shifted by the running mean: with |mean| / std = 1e4 (where
  E[x^2] - E[x]^2 in float32 would cancel to noise) the output and the input gradient still match
  torch's BatchNorm in float64 once the running mean is near the batch mean, and before that (shift 0)
  at the mean/std ratios a ResNet has at initialisation (about 10 at most)."""
  import torch
  rng = np.random.default_rng(7)
  means = np.array([100.0, -50.0, 3.0]) * (1.0 if std < 1 else std / 10.0)
  x = (rng.normal(size=(16, 4, 4, 3)) * std + means).astype(np.float32)
  w = rng.normal(size=x.shape).astype(np.float32)
  bn = BatchNorm(use_running_average=False)
  params = {"scale": jnp.asarray([1.5, 0.5, 2.0]), "bias": jnp.asarray([0.25, 0.0, -1.0])}
  stats = {"mean": jnp.asarray(running_mean, jnp.float32), "var": jnp.ones(3)}

  def loss(x):
    y, _ = bn.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
    return jnp.sum(y * w), y

  (_, y), gx = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.asarray(x))
  xt = torch.tensor(x.astype(np.float64)).permute(0, 3, 1, 2).requires_grad_()
  yt = torch.nn.functional.batch_norm(xt, None, None, torch.tensor(np.asarray(params["scale"], np.float64)),
                                      torch.tensor(np.asarray(params["bias"], np.float64)), training=True, eps=1e-5)
  (yt * torch.tensor(w.astype(np.float64)).permute(0, 3, 1, 2)).sum().backward()
  # x itself is float32 (ulp 8e-6 at 100, std 0.01): the reference sees the same rounded inputs.
  np.testing.assert_allclose(np.asarray(y), yt.detach().permute(0, 2, 3, 1).numpy(), atol=atol)
  ref_g = xt.grad.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(gx), ref_g, atol=atol * np.abs(ref_g).max())


@pytest.mark.parametrize("groups", [1, 2])
def test_masked_rows_take_no_part_in_the_statistics(groups):
  """Rows of undecodable samples (mask False) are left out of the batch statistics, per group, against
  float64 numpy over the valid rows; a group with no valid row leaves the running statistics alone."""
  rng = np.random.default_rng(groups)
  x = (rng.normal(size=(16, 3, 3, 4)) * 2 + 5).astype(np.float32)
  mask = np.ones(16, bool)
  mask[[1, 5, 6, 13]] = False
  x[~mask] = 0.0                                           # what a skipped sample's crops become
  bn = BatchNorm(use_running_average=False, num_groups=groups, momentum=0.9)
  variables = bn.init(jax.random.key(0), jnp.asarray(x))
  y, upd = bn.apply(variables, jnp.asarray(x), jnp.asarray(mask), mutable=["batch_stats"])
  size, means, vars_unbiased = 16 // groups, [], []
  for g in range(groups):
    rows = slice(g * size, (g + 1) * size)
    part = x[rows][mask[rows]].astype(np.float64)
    m, v = part.mean((0, 1, 2)), part.var((0, 1, 2))
    np.testing.assert_allclose(np.asarray(y)[rows][mask[rows]], (part - m) / np.sqrt(v + 1e-5), atol=2e-5)
    n = part.size // 4
    means.append(m)
    vars_unbiased.append(v * n / (n - 1))
  np.testing.assert_allclose(np.asarray(upd["batch_stats"]["mean"]), 0.1 * np.mean(means, 0), atol=1e-5)
  np.testing.assert_allclose(np.asarray(upd["batch_stats"]["var"]), 0.9 + 0.1 * np.mean(vars_unbiased, 0), rtol=1e-5)
  # No valid row at all: the running statistics stay as they were.
  _, upd = bn.apply(variables, jnp.asarray(x), jnp.zeros(16, bool), mutable=["batch_stats"])
  np.testing.assert_array_equal(np.asarray(upd["batch_stats"]["mean"]), np.zeros(4))
  np.testing.assert_array_equal(np.asarray(upd["batch_stats"]["var"]), np.ones(4))


@pytest.mark.torch
@pytest.mark.parametrize("per_device", [4, 8, 16])
def test_groups_of_samples_on_8_devices_match_torch(per_device):
  """model.sync_bn.samples=8 on 8 devices holding 4, 8 or 16 samples each (2 crops per sample, rows
  sample-major as the model makes them): groups span 2 devices, fill one, or split one in two; output and
  running statistics equal torch's BatchNorm (float64) over each group's rows."""
  import torch
  mesh = make_mesh()
  batch = 8 * per_device
  groups = num_groups(sync_bn(samples=8), batch, 8, 8)
  assert groups == batch // 8
  rng = np.random.default_rng(per_device)
  rows = 2 * batch
  x = (rng.normal(size=(rows, 3, 3, 5)) * 3 + np.repeat(np.arange(rows) % 7, 1)[:, None, None, None]).astype(np.float32)
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  bn = BatchNorm(use_running_average=False, num_groups=groups, momentum=0.9)
  variables = bn.init(jax.random.key(0), xs)
  y, upd = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))(variables, xs)
  want_y, means, var = [], [], []
  for g in range(groups):
    ref = torch.nn.BatchNorm2d(5, momentum=0.1, dtype=torch.float64).train()
    part = torch.from_numpy(x[g * 16:(g + 1) * 16].astype(np.float64)).permute(0, 3, 1, 2)   # 8 samples x 2 crops
    want_y.append(ref(part).permute(0, 2, 3, 1).detach().numpy())
    means.append(ref.running_mean.numpy())
    var.append(ref.running_var.numpy())
  np.testing.assert_allclose(np.asarray(y), np.concatenate(want_y), atol=2e-5)
  np.testing.assert_allclose(np.asarray(upd["batch_stats"]["mean"]), np.mean(means, 0), atol=1e-5)
  np.testing.assert_allclose(np.asarray(upd["batch_stats"]["var"]), np.mean(var, 0), rtol=1e-5)
