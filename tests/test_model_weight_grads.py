"""Weight gradients summed over the devices in float32 (weight_grads.py): the same gradients as plain autodiff,
and, with 16-bit compute, each device's gradient summed in float32 (what PyTorch DDP does under AMP)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dcv2_jax.model import weight_grads
from dcv2_jax.sharding import make_mesh

MESH = make_mesh()
ROWS = 16                     # 2 rows on each of the 8 devices


def conv_op(stride, pad, groups):
  return functools.partial(jax.lax.conv_general_dilated, window_strides=(stride, stride),
                           padding=((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                           feature_group_count=groups, precision=jax.lax.Precision.HIGHEST)


def dense_op():
  return functools.partial(jax.lax.dot_general, dimension_numbers=(((1,), (0,)), ((), ())),
                           precision=jax.lax.Precision.HIGHEST)


# (op, x shape, kernel shape): the convolutions of a ResNet (1x1, 3x3, strided, the 7x7 stem, ResNeXt's groups)
# and the head's dense layers.
CASES = {
    "1x1": (conv_op(1, 0, 1), (ROWS, 6, 6, 8), (1, 1, 8, 12)),
    "1x1/2": (conv_op(2, 0, 1), (ROWS, 7, 7, 8), (1, 1, 8, 12)),
    "3x3": (conv_op(1, 1, 1), (ROWS, 6, 6, 8), (3, 3, 8, 12)),
    "3x3/2": (conv_op(2, 1, 1), (ROWS, 7, 7, 8), (3, 3, 8, 12)),
    "7x7/2 stem": (conv_op(2, 3, 1), (ROWS, 12, 12, 3), (7, 7, 3, 8)),
    "3x3 groups 4": (conv_op(1, 1, 4), (ROWS, 5, 5, 8), (3, 3, 2, 12)),
    "dense": (dense_op(), (ROWS, 24), (24, 10)),
}


def inputs(x_shape, k_shape, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=x_shape).astype(np.float32)
  k = rng.normal(size=k_shape).astype(np.float32) / np.sqrt(np.prod(k_shape[:-1]))
  return x, k


def cotangent(op, x, k, seed=1):
  y = jax.eval_shape(op, x, k)
  return np.random.default_rng(seed).normal(size=y.shape).astype(np.float32)


@pytest.mark.parametrize("case", list(CASES))
def test_float32_gradients_equal_plain_autodiff(case):
  """In float32 the per-device backward pass and its psum give exactly what autodiff of the whole op gives."""
  op, x_shape, k_shape = CASES[case]
  x, k = inputs(x_shape, k_shape)
  g = cotangent(op, x, k)
  rows = NamedSharding(MESH, P("data"))
  ours = weight_grads.summed_in_float32(op, jnp.float32, MESH)
  loss = lambda f: jax.jit(jax.grad(lambda x, k: jnp.sum(f(x, k) * g), argnums=(0, 1)))(
      jax.device_put(x, rows), jax.device_put(k, NamedSharding(MESH, P())))
  (dx, dk), (ref_dx, ref_dk) = loss(ours), loss(op)
  np.testing.assert_allclose(np.asarray(dx), np.asarray(ref_dx), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dk), np.asarray(ref_dk), rtol=1e-5, atol=1e-5)
  assert dk.dtype == jnp.float32


@pytest.mark.parametrize("case", ["3x3/2", "3x3 groups 4", "dense"])
def test_bfloat16_kernel_gradient_is_the_float32_sum_of_each_devices_gradient(case):
  """bfloat16 compute: each device's kernel gradient is its own bfloat16 backward op, and the devices' gradients
  are summed in float32 (the reference: the 8 per-device gradients of plain autodiff, summed in float64)."""
  op, x_shape, k_shape = CASES[case]
  x, k = inputs(x_shape, k_shape, seed=2)
  g = cotangent(op, x, k, seed=3)
  x16, g16 = x.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
  ours = weight_grads.summed_in_float32(op, jnp.bfloat16, MESH)
  dk = jax.jit(jax.grad(lambda x, k: jnp.sum((ours(x, k) * g16).astype(jnp.float32)), argnums=1))(
      jax.device_put(x16, NamedSharding(MESH, P("data"))), jax.device_put(k, NamedSharding(MESH, P())))
  per_device = jax.jit(jax.vmap(lambda x, g: jax.vjp(op, x, jnp.asarray(k, jnp.bfloat16))[1](g)[1]))(
      x16.reshape((8, -1) + x16.shape[1:]), g16.reshape((8, -1) + g16.shape[1:]))
  per_device = np.asarray(per_device, np.float64)
  assert dk.dtype == jnp.float32
  # Within each device's own bfloat16 rounding (2^-9 of each term: XLA:CPU may keep the backward op's float32
  # result, the GPU's cuDNN rounds it to bfloat16): the sum of the 8 per-device gradients, not of anything else.
  bound = 2.0 ** -8 * np.abs(per_device).sum(0) + 1e-6
  assert np.all(np.abs(np.asarray(dk, np.float64) - per_device.sum(0)) <= bound)


def test_layer_options_leave_float32_compute_and_the_compute_choice_alone():
  assert weight_grads.layer_options("conv", jnp.float32, MESH) == {}
  assert weight_grads.layer_options("dense", jnp.bfloat16, None) == {}
  assert set(weight_grads.layer_options("conv", jnp.bfloat16, MESH)) == {"conv_general_dilated", "promote_dtype"}
  assert set(weight_grads.layer_options("dense", jnp.float16, MESH)) == {"dot_general", "promote_dtype"}
