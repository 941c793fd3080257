"""The ResNet trunk (torchvision-exact) and `TrunkArch`, the one description of its network.

Module and parameter names mirror torchvision's state-dict keys (`layer1_0/conv1` is `layer1.0.conv1`)
so that weight export is a renaming plus transposes. Padding is explicit and symmetric, never 'SAME',
because 'SAME' pads stride-2 convolutions asymmetrically and the numbers would not match torchvision.

Width multiplier follows the SwAV repo's ResNet-50-wN (every channel count times N, features 2048*N),
which is what the published wide DCv2/SwAV checkpoints use; torchvision's wide_resnet50_2 is a
different network (only the bottleneck's inner width doubles).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dcv2_jax.model import weight_grads
from dcv2_jax.model.batchnorm import BatchNorm

STAGES = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
          101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}
# model.stem: "imagenet" = 7x7/2 conv + 3x3/2 max-pool (torchvision); "cifar" = 3x3/1 conv, no max-pool (the
# CIFAR ResNet of solo-learn and the CIFAR literature, for 32-96 px images).
STEMS = ("imagenet", "cifar")

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'), untruncated.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


@dataclasses.dataclass(frozen=True)
class TrunkArch:
  """What defines the trunk's network, not its training: the one description that training, evaluation, export
  and import (load.py reads it back from a state dict) share. Hashable: the evaluation forward is cached by it.

  groups, width_per_group: ResNeXt's grouped 3x3 convolutions (torchvision's resnext50_32x4d: 32, 4); base_width:
  the stem's channels at width 1 (< 64 only for small tests and the demo).
  """
  depth: int = 50
  width: int = 1
  base_width: int = 64
  groups: int = 1
  width_per_group: int = 64
  stem: str = "imagenet"
  bn_eps: float = 1e-5

  @classmethod
  def from_config(cls, model_cfg) -> "TrunkArch":
    m = model_cfg
    return cls(int(m.depth), int(m.width), int(m.base_width), int(m.groups), int(m.width_per_group), str(m.stem),
               float(m.bn_eps))

  @property
  def bottleneck(self) -> bool:
    return STAGES[self.depth][0] == "bottleneck"

  @property
  def feature_dim(self) -> int:
    """Channels of the pooled output: 512 (18/34) or 2048 (50+) for base width 64, times width."""
    return self.base_width * self.width * 8 * (4 if self.bottleneck else 1)

  def describe(self) -> str:
    return f"ResNet-{self.depth}" + (f" {self.groups}x{self.width_per_group}d" if self.groups > 1 else "")


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
  downsample: bool
  arch: TrunkArch
  norm: Any
  conv: Any                        # functools.partial(Conv, dtype=..., precision=..., grad_mesh=...)

  @nn.compact
  def __call__(self, x, mask=None):
    a = self.arch
    if a.bottleneck:
      width = int(self.planes * a.width_per_group / 64) * a.groups
      convs = ((width, 1, 1, 1), (width, 3, self.stride, a.groups), (self.planes * 4, 1, 1, 1))
    else:
      convs = ((self.planes, 3, self.stride, 1), (self.planes, 3, 1, 1))
    y = x
    for i, (features, kernel, stride, groups) in enumerate(convs, start=1):
      y = self.conv(features, kernel, stride, groups=groups, name=f"conv{i}")(y)
      y = self.norm(name=f"bn{i}")(y, mask)
      if i < len(convs):
        y = nn.relu(y)
    if self.downsample:
      x = self.conv(convs[-1][0], 1, self.stride, name="downsample_conv")(x)
      x = self.norm(name="downsample_bn")(x, mask)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """Trunk: images [B,H,W,3] (normalised) -> pooled float32 features [B, arch.feature_dim].

  mask [B] bool (train mode): the rows that enter BatchNorm's statistics (default all). bn_groups: SyncBN
  groups of the batch (batchnorm.py); grad_mesh: see Conv.
  """
  arch: TrunkArch = TrunkArch()
  dtype: Any = jnp.float32
  bn_groups: int = 1
  bn_momentum: float = 0.9
  precision: Any = None
  grad_mesh: Any = None

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    a = self.arch
    norm = functools.partial(BatchNorm, not train, self.bn_groups, self.bn_momentum, a.bn_eps, self.dtype)
    conv = functools.partial(Conv, dtype=self.dtype, precision=self.precision, grad_mesh=self.grad_mesh)
    channels = a.base_width * a.width
    x = x.astype(self.dtype)
    if a.stem == "cifar":
      x = nn.relu(norm(name="bn1")(conv(channels, 3, 1, name="conv1")(x), mask))
    else:
      x = nn.relu(norm(name="bn1")(conv(channels, 7, 2, name="conv1")(x), mask))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    in_ch = channels
    for stage, n in enumerate(STAGES[a.depth][1]):
      planes = channels * 2 ** stage
      out_ch = planes * (4 if a.bottleneck else 1)
      for i in range(n):
        stride = 2 if (stage > 0 and i == 0) else 1
        x = Block(planes, stride, i == 0 and (stride != 1 or in_ch != out_ch), a, norm, conv,
                  name=f"layer{stage + 1}_{i}")(x, mask)
        in_ch = out_ch
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


@functools.lru_cache(maxsize=None)
def trunk_apply_fn(arch: TrunkArch):
  """jit(apply) of the trunk in eval mode (running BN statistics), float32: the evaluation forward.

  Cached, so every caller with the same architecture shares one jitted (and compiled) function.
  """
  trunk = ResNet(arch)
  return jax.jit(lambda variables, images: trunk.apply(variables, images, train=False))
