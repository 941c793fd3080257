"""The projection head: the MLP between the trunk's pooled features and the embedding DCv2 clusters."""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dcv2_jax.model import weight_grads
from dcv2_jax.model.batchnorm import BatchNorm

# torch.nn.Linear default: kaiming_uniform_(a=sqrt(5)) == U(+-1/sqrt(fan_in)); same bound for the bias.
linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_linear_bias_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class ProjectionHead(nn.Module):
  """MLP from config: Linear(+bias) [-> BN] [-> ReLU] per hidden layer, plain Linear last.

  dims=(2048, 128) with bn is the SwAV-repo head; (2048, 2048, 128) the seed document's 3-layer MLP.
  grad_mesh: see trunk.Conv.
  """
  dims: Sequence[int]
  use_bn: bool = True
  use_relu: bool = True
  dtype: Any = jnp.float32
  bn_groups: int = 1
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  precision: Any = None
  grad_mesh: Any = None

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
