"""ResNet trunk (torchvision-exact), projection head and the DCv2 multi-crop model.

Module and parameter names mirror torchvision's state-dict keys (`layer1_0/conv1` is `layer1.0.conv1`)
so that weight export is a renaming plus transposes. Padding is explicit and symmetric, never 'SAME',
because 'SAME' pads stride-2 convolutions asymmetrically and the numbers would not match torchvision.

Width multiplier follows the SwAV repo's ResNet-50-wN (every channel count times N, features 2048*N),
which is what the published wide DCv2/SwAV checkpoints use; torchvision's wide_resnet50_2 is a
different network (only the bottleneck's inner width doubles).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dcv2_jax import weight_grads
from dcv2_jax.batchnorm import BatchNorm

STAGES = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
          101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# model.matmul_precision (and loss.kmeans_precision): "default" lets the backend choose (TF32 for float32 on
# NVIDIA GPUs since Ampere); "highest" is true float32, as the SwAV repo's V100 runs (V100s have no TF32).
PRECISIONS = {"default": None, "highest": jax.lax.Precision.HIGHEST}
# model.stem: "imagenet" = 7x7/2 conv + 3x3/2 max-pool (torchvision); "cifar" = 3x3/1 conv, no max-pool (the
# CIFAR ResNet of solo-learn and the CIFAR literature, for 32-96 px images).
STEMS = ("imagenet", "cifar")

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'), untruncated.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear default: kaiming_uniform_(a=sqrt(5)) == U(+-1/sqrt(fan_in)); same bound for the bias.
linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def feature_dim(depth: int, width: int = 1, base_width: int = 64) -> int:
  """Channels of the pooled trunk output: 512 (18/34) or 2048 (50+) for base width 64, times width."""
  kind, _ = STAGES[depth]
  return base_width * width * 8 * (4 if kind == "bottleneck" else 1)


class Conv(nn.Module):
  """Bias-free convolution with torchvision's symmetric padding k // 2 (`groups` > 1: ResNeXt's grouped conv).

  grad_mesh: the mesh over which the kernel's gradient is summed in float32 (weight_grads.py); None: as XLA
  chooses (in the compute dtype for a kernel used once).
  """
  features: int
  kernel: int
  stride: int = 1
  dtype: Any = jnp.float32
  groups: int = 1
  precision: Any = None
  grad_mesh: Any = None

  @nn.compact
  def __call__(self, x):
    p = self.kernel // 2
    return nn.Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride),
                   padding=((p, p), (p, p)), use_bias=False, dtype=self.dtype, feature_group_count=self.groups,
                   param_dtype=jnp.float32, kernel_init=conv_init, precision=self.precision, name="conv",
                   **weight_grads.layer_options("conv", self.dtype, self.grad_mesh))(x)


class Block(nn.Module):
  """BasicBlock (two 3x3) or Bottleneck (1x1, 3x3 with the stride: ResNet v1.5, 1x1 x4).

  Bottleneck width as torchvision's: int(planes * width_per_group / 64) * groups, the 3x3 conv in `groups`
  groups (ResNeXt-50 32x4d: groups 32, width_per_group 4; plain ResNets: 1 and 64).
  """
  planes: int
  stride: int
  bottleneck: bool
  downsample: bool
  norm: Any
  dtype: Any
  groups: int = 1
  width_per_group: int = 64
  precision: Any = None
  grad_mesh: Any = None

  @nn.compact
  def __call__(self, x, mask=None):
    if self.bottleneck:
      width = int(self.planes * self.width_per_group / 64) * self.groups
      convs = ((width, 1, 1, 1), (width, 3, self.stride, self.groups), (self.planes * 4, 1, 1, 1))
    else:
      convs = ((self.planes, 3, self.stride, 1), (self.planes, 3, 1, 1))
    y = x
    for i, (features, kernel, stride, groups) in enumerate(convs, start=1):
      y = Conv(features, kernel, stride, self.dtype, groups, self.precision, self.grad_mesh, name=f"conv{i}")(y)
      y = self.norm(name=f"bn{i}")(y, mask)
      if i < len(convs):
        y = nn.relu(y)
    if self.downsample:
      x = Conv(convs[-1][0], 1, self.stride, self.dtype, precision=self.precision, grad_mesh=self.grad_mesh,
               name="downsample_conv")(x)
      x = self.norm(name="downsample_bn")(x, mask)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """Trunk: images [B,H,W,3] (normalised) -> pooled float32 features [B, feature_dim].

  mask [B] bool (train mode): the rows that enter BatchNorm's statistics (default all).
  """
  depth: int = 50
  width: int = 1
  base_width: int = 64
  dtype: Any = jnp.float32
  bn_groups: int = 1
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  groups: int = 1
  width_per_group: int = 64
  stem: str = "imagenet"
  precision: Any = None
  grad_mesh: Any = None           # see Conv

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    kind, blocks = STAGES[self.depth]
    bottleneck = kind == "bottleneck"
    norm = lambda name: BatchNorm(not train, self.bn_groups, self.bn_momentum, self.bn_eps, self.dtype,
                                  name=name)
    channels = self.base_width * self.width
    if self.stem == "cifar":
      x = Conv(channels, 3, 1, self.dtype, precision=self.precision, grad_mesh=self.grad_mesh,
               name="conv1")(x.astype(self.dtype))
      x = nn.relu(norm("bn1")(x, mask))
    else:
      x = Conv(channels, 7, 2, self.dtype, precision=self.precision, grad_mesh=self.grad_mesh,
               name="conv1")(x.astype(self.dtype))
      x = nn.relu(norm("bn1")(x, mask))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    in_ch = channels
    for stage, n in enumerate(blocks):
      planes = channels * 2 ** stage
      out_ch = planes * (4 if bottleneck else 1)
      for i in range(n):
        stride = 2 if (stage > 0 and i == 0) else 1
        x = Block(planes, stride, bottleneck, i == 0 and (stride != 1 or in_ch != out_ch), norm, self.dtype,
                  self.groups, self.width_per_group, self.precision, self.grad_mesh,
                  name=f"layer{stage + 1}_{i}")(x, mask)
        in_ch = out_ch
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def _torch_linear_bias_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class ProjectionHead(nn.Module):
  """MLP from config: Linear(+bias) [-> BN] [-> ReLU] per hidden layer, plain Linear last.

  dims=(2048, 128) with bn is the SwAV-repo head; (2048, 2048, 128) the seed document's 3-layer MLP.
  """
  dims: Sequence[int]
  use_bn: bool = True
  use_relu: bool = True
  dtype: Any = jnp.float32
  bn_groups: int = 1
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  precision: Any = None
  grad_mesh: Any = None           # see Conv

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    for i, d in enumerate(self.dims):
      x = nn.Dense(d, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=linear_init, precision=self.precision,
                   bias_init=_torch_linear_bias_init(x.shape[-1]), name=f"linear{i}",
                   **weight_grads.layer_options("dense", self.dtype, self.grad_mesh))(x)
      if i < len(self.dims) - 1:
        if self.use_bn:
          x = BatchNorm(not train, self.bn_groups, self.bn_momentum, self.bn_eps, self.dtype,
                        name=f"bn{i}")(x, mask)
        if self.use_relu:
          x = nn.relu(x)
    return x.astype(jnp.float32)


def l2_normalize(x, eps: float = 1e-12):
  # Matches torch.nn.functional.normalize: x / max(||x||, eps).
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class DCv2Model(nn.Module):
  """Multi-crop forward: crop groups -> unit embeddings z [B, C, D], sample-major.

  `crops` is a list with one array [B, n_g, S_g, S_g, 3] per crop group. Consecutive groups of equal size
  go through the trunk together (as the reference concatenates equal resolutions). Rows stay
  sample-major ([B, n] -> [B*n]) so every reshape keeps each device's rows on that device.
  mask [B] bool: the samples whose rows enter BatchNorm's statistics (not the undecodable ones).
  """
  depth: int = 50
  width: int = 1
  base_width: int = 64
  head_dims: Sequence[int] = (2048, 128)
  head_bn: bool = True
  head_relu: bool = True
  dtype: Any = jnp.float32
  bn_groups: int = 1
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  groups: int = 1
  width_per_group: int = 64
  stem: str = "imagenet"
  precision: Any = None
  grad_mesh: Any = None           # see Conv

  def setup(self):
    bn = dict(bn_groups=self.bn_groups, bn_momentum=self.bn_momentum, bn_eps=self.bn_eps)
    self.trunk = ResNet(self.depth, self.width, self.base_width, self.dtype, groups=self.groups,
                        width_per_group=self.width_per_group, stem=self.stem, precision=self.precision,
                        grad_mesh=self.grad_mesh, **bn)
    self.head = ProjectionHead(tuple(self.head_dims), self.head_bn, self.head_relu, self.dtype,
                               precision=self.precision, grad_mesh=self.grad_mesh, **bn)

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
  return DCv2Model(m.depth, m.width, m.base_width, tuple(m.head_dims), m.head_bn, m.head_relu,
                   DTYPES[m.dtype], bn_groups, m.bn_momentum, m.bn_eps, m.groups, m.width_per_group, m.stem,
                   PRECISIONS[m.matmul_precision], mesh if m.grad_reduce_dtype == "float32" else None)


def trunk_arch(model_cfg) -> dict:
  """What defines the trunk's network (not its training): the keyword arguments of trunk_apply_fn."""
  return dict(depth=int(model_cfg.depth), width=int(model_cfg.width), base_width=int(model_cfg.base_width),
              bn_eps=float(model_cfg.bn_eps), groups=int(model_cfg.groups),
              width_per_group=int(model_cfg.width_per_group), stem=str(model_cfg.stem))


@functools.lru_cache(maxsize=None)
def trunk_apply_fn(depth: int, width: int = 1, base_width: int = 64, bn_eps: float = 1e-5, groups: int = 1,
                   width_per_group: int = 64, stem: str = "imagenet"):
  """jit(apply) of the trunk in eval mode (running BN statistics), float32: the evaluation forward.

  Cached, so every caller with the same architecture shares one jitted (and compiled) function.
  """
  trunk = ResNet(depth, width, base_width, jnp.float32, bn_eps=bn_eps, groups=groups,
                 width_per_group=width_per_group, stem=stem)
  return jax.jit(lambda variables, images: trunk.apply(variables, images, train=False))
