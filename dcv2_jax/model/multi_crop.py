"""The DCv2 network: a batch's crop groups through the trunk and the head to unit embeddings, and the factory
that builds it from a config."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dcv2_jax.conventions import DTYPES, PRECISIONS, l2_normalize
from dcv2_jax.model.head import ProjectionHead
from dcv2_jax.model.trunk import ResNet, TrunkArch


class DCv2Model(nn.Module):
  """Multi-crop forward: crop groups -> unit embeddings z [B, C, D], sample-major.

  `crops` is a list with one array [B, n_g, S_g, S_g, 3] per crop group. Consecutive groups of equal size
  go through the trunk together (as the reference concatenates equal resolutions). Rows stay
  sample-major ([B, n] -> [B*n]) so every reshape keeps each device's rows on that device.
  mask [B] bool: the samples whose rows enter BatchNorm's statistics (not the undecodable ones).
  """
  trunk_arch: TrunkArch = TrunkArch()
  head_dims: Sequence[int] = (2048, 128)
  head_bn: bool = True
  head_relu: bool = True
  dtype: Any = jnp.float32
  bn_groups: int = 1
  bn_momentum: float = 0.9
  precision: Any = None
  grad_mesh: Any = None           # see trunk.Conv

  def setup(self):
    common = dict(dtype=self.dtype, bn_groups=self.bn_groups, bn_momentum=self.bn_momentum,
                  precision=self.precision, grad_mesh=self.grad_mesh)
    self.trunk = ResNet(self.trunk_arch, **common)
    self.head = ProjectionHead(tuple(self.head_dims), self.head_bn, self.head_relu, bn_eps=self.trunk_arch.bn_eps,
                               **common)

  def __call__(self, crops, train: bool = True, mask=None):
    rows = lambda n: None if mask is None else jnp.repeat(mask, n)      # sample-major: each sample's n rows
    feats = []
    for group in _equal_size_runs(crops):
      x = jnp.concatenate(group, axis=1) if len(group) > 1 else group[0]
      b, n = x.shape[:2]
      feats.append(self.trunk(x.reshape((b * n,) + x.shape[2:]), train, rows(n)).reshape(b, n, -1))
    f = jnp.concatenate(feats, axis=1) if len(feats) > 1 else feats[0]
    b, c = f.shape[:2]
    z = self.head(f.reshape(b * c, -1), train, rows(c))
    return l2_normalize(z).reshape(b, c, -1)


def _equal_size_runs(crops, size=lambda x: x.shape[2:]):
  """Consecutive crop groups of equal size: each run is one pass through the trunk."""
  runs = []
  for x in crops:
    if runs and size(runs[-1][0]) == size(x):
      runs[-1].append(x)
    else:
      runs.append([x])
  return runs


def crops_per_trunk_pass(crops) -> list[int]:
  """Crops per sample in each trunk pass of `data.crops` (2x160+4x96 -> [2, 4]; 2x224 + 2x224 -> [4])."""
  return [sum(int(g[1]) for g in run) for run in _equal_size_runs(list(crops), size=lambda g: int(g[0]))]


def dcv2_model(config, bn_groups: int, mesh=None) -> DCv2Model:
  """The DCv2Model of a (validated) config, BatchNorm statistics in `bn_groups` groups, weight gradients summed
  over `mesh` in float32 (model.grad_reduce_dtype=float32) or as XLA chooses (compute, or no mesh)."""
  m = config.model
  return DCv2Model(TrunkArch.from_config(m), tuple(m.head_dims), m.head_bn, m.head_relu, DTYPES[m.dtype], bn_groups,
                   m.bn_momentum, PRECISIONS[m.matmul_precision], mesh if m.grad_reduce_dtype == "float32" else None)
