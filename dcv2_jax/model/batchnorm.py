"""Cross-replica BatchNorm with SyncBN-style groups.

Flax's BatchNorm reduces over the whole (global) batch under jit, which is SyncBN with one group. DCv2's
published runs synchronise BN in groups of 8 GPUs, so we need statistics per group of devices; that is
the one semantic difference from `flax.linen.BatchNorm` and the reason this module exists.

How groups map to devices: the batch axis is sharded contiguously over the mesh's data axis, so device d
holds rows [d*n, (d+1)*n), and the model's rows are sample-major (each sample's crops together). Reshaping
the batch to [G, N/G, ...] therefore puts G groups of consecutive samples side by side: a group spans
several devices (a mean over axis 1 is then an all-reduce inside each group, which XLA inserts) or a
device holds several groups (`model.sync_bn.samples` fixes the samples per group whatever the device
count, so a recipe's statistics do not change with the number of GPUs).

PyTorch conventions kept for weight export: normalise with the biased batch variance, update the running
variance with the unbiased one, eps 1e-5, momentum 0.9 in Flax terms (0.1 in PyTorch's).
Running statistics are replicated: they take the mean over groups of the group statistics (SyncBN's
replicas would each keep their own group's, and the reference saves rank 0's).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchNorm(nn.Module):
  use_running_average: bool
  num_groups: int = 1             # 1 = global statistics
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32        # output dtype; statistics are always float32

  @nn.compact
  def __call__(self, x, mask=None):
    """x [rows, ..., features]; mask [rows] bool: only these rows enter the statistics (a batch's
    undecodable samples do not: their rows are zeros), every row is normalised with them."""
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))

    if self.use_running_average:
      y = (x.astype(jnp.float32) - ra_mean.value) * (scale * jnp.reciprocal(jnp.sqrt(ra_var.value + self.epsilon)))
      return (y + bias).astype(self.dtype)

    g = self.num_groups
    if x.shape[0] % g:
      raise ValueError(f"BatchNorm: batch {x.shape[0]} is not divisible into {g} SyncBN groups")
    xg = x.reshape((g, x.shape[0] // g) + x.shape[1:]).astype(jnp.float32)
    axes = tuple(range(1, xg.ndim - 1))
    per_row = xg.size // (x.shape[0] * features)            # spatial positions per row
    # One pass over x for both moments, shifted by the running mean. Why not the textbook two passes
    # (mean, then mean((x - mean)^2)): the second reduction waits for the first, so x is read twice more
    # and, across devices, two all-reduces run one after the other; here both moments come from one fused
    # reduction and one all-reduce, as flax's fast variance. The shift (a constant: no gradient) keeps
    # E[d^2] - E[d]^2 from cancelling: once the running mean tracks the batch mean, d = x - shift is
    # centred (PyTorch gets the same stability from Welford's update inside its kernel).
    shift = jax.lax.stop_gradient(ra_mean.value)
    d = xg - shift
    if mask is None:
      count = jnp.float32(xg.size // (g * features))
      d_mean = d.mean(axes, keepdims=True)
      d_sq = jnp.square(d).mean(axes, keepdims=True)
      group_weight = jnp.ones((g,), jnp.float32)
    else:
      m = mask.reshape((g, x.shape[0] // g) + (1,) * (xg.ndim - 2)).astype(jnp.float32)
      rows = m.sum(axis=tuple(range(1, m.ndim)))                                    # [g] valid rows
      count = (rows * per_row).reshape((g,) + (1,) * (xg.ndim - 1))
      d = d * m
      d_mean = d.sum(axes, keepdims=True) / jnp.maximum(count, 1.0)
      d_sq = jnp.square(d).sum(axes, keepdims=True) / jnp.maximum(count, 1.0)
      group_weight = (rows > 0).astype(jnp.float32)                               # a group of no valid row
    var = jnp.maximum(d_sq - jnp.square(d_mean), 0.0)
    mean = d_mean + shift

    if not self.is_initializing():
      momentum = self.momentum
      unbiased = var * (count / jnp.maximum(count - 1.0, 1.0))
      # The mean over groups of the groups' statistics; a group without a valid row has none and is left out,
      # and a batch without any leaves the running statistics as they were.
      w = group_weight / jnp.maximum(group_weight.sum(), 1.0)
      any_valid = group_weight.sum() > 0
      new_mean = (mean.reshape(g, features) * w[:, None]).sum(0)
      new_var = (unbiased.reshape(g, features) * w[:, None]).sum(0)
      ra_mean.value = jnp.where(any_valid, momentum * ra_mean.value + (1 - momentum) * new_mean, ra_mean.value)
      ra_var.value = jnp.where(any_valid, momentum * ra_var.value + (1 - momentum) * new_var, ra_var.value)

    y = (xg - mean) * jnp.reciprocal(jnp.sqrt(var + self.epsilon)) * scale + bias
    return y.reshape(x.shape).astype(self.dtype)


def num_groups(sync_bn, global_batch: int, num_devices: int, local_devices: int) -> int:
  """The number of BatchNorm groups of a (validated) `model.sync_bn`: groups of `samples` samples whatever
  the devices (the batch is sample-major, so a group is `samples` consecutive samples, all their crops), or
  else groups of `group_size` devices (VISSL's GROUP_SIZE: 0 global, -1 one host)."""
  if sync_bn.samples > 0:
    return global_batch // sync_bn.samples
  size = {0: num_devices, -1: local_devices}.get(sync_bn.group_size, sync_bn.group_size)
  return num_devices // size


def describe_groups(sync_bn, global_batch: int, num_devices: int, local_devices: int, crop_runs) -> str:
  """The BatchNorm batch the run gets, for its log: groups, samples per group, and rows per group in the
  trunk (per forward of equal-size crops, `crop_runs` = crops per sample of each) and in the head."""
  groups = num_groups(sync_bn, global_batch, num_devices, local_devices)
  samples = global_batch // groups
  per_device = global_batch // num_devices
  layout = (f"{samples // per_device} device(s) per group" if samples >= per_device
            else f"{per_device // samples} groups per device")
  trunk = " + ".join(f"{samples * n} ({n} crops x {samples})" for n in crop_runs)
  return (f"BatchNorm statistics in {groups} group(s) of {samples} samples ({layout}, {per_device} samples per "
          f"device): {trunk} rows per group in the trunk, {samples * sum(crop_runs)} in the head")
