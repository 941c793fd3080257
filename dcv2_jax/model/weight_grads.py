"""Weight gradients summed over the devices in float32, whatever the compute dtype (`model.grad_reduce_dtype`).

Why this exists: under jit, XLA sums a replicated weight's gradient over the devices at the op that produces
it, in that op's dtype. With bfloat16 compute, a weight used once per step (every layer of the 2x224 trunk,
the head) gets its gradient from a bfloat16 backward convolution or matmul, so XLA all-reduces it in
bfloat16, and every hop of the ring rounds the partial sum to 8 bits of mantissa (found by compiling the
step for 8 H100s: `python -m dcv2_jax.bench compile`). With our model's per-device gradients that is 0.37%
relative error over 8 devices and 1.0% over 64, against 3e-10 and 2e-9 in float32 (`python -m dcv2_jax.bench
grad_sum`). The references (PyTorch DDP under apex / torch AMP) convert each device's gradient to float32 and sum
in float32.

So here the backward pass of a convolution or dense layer runs per device (shard_map over the mesh's data
axis, on each device's rows): the input gradient and the weight gradient come from the same compute-dtype
kernels as before (cuDNN / cuBLAS, float32 accumulation), and the weight gradient is converted to float32
before an explicit float32 psum. XLA cannot move a psum across the conversion, so the sum is float32, as
PyTorch's. The forward pass is unchanged. It costs twice the gradient all-reduce bytes (the measured figures
are in docs/performance.md); `model.grad_reduce_dtype=compute` gives XLA's choice back.

The layers use these through flax's injection points (nn.Conv's `conv_general_dilated`, nn.Dense's
`dot_general`, and `promote_dtype`, which keeps the kernel float32 so that the conversion to the compute dtype
happens here, inside the custom gradient), so the parameter tree and its names do not change.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes
from jax.sharding import PartitionSpec as P

REDUCE_DTYPES = ("float32", "compute")   # model.grad_reduce_dtype


def summed_in_float32(op: Callable, dtype, mesh) -> Callable:
  """op(x, kernel) -> y (a convolution or matmul), with a float32 kernel used in `dtype` and a backward pass
  whose kernel gradient is summed over `mesh`'s data axis in float32. x and the output gradient are split
  over that axis along their first (batch) dimension, as the train step's activations are."""
  axis = mesh.axis_names[0]

  @jax.custom_vjp
  def apply(x, kernel):
    return op(x, kernel.astype(dtype))

  def forward(x, kernel):
    return apply(x, kernel), (x, kernel)

  def backward(saved, g):
    x, kernel = saved

    def per_device(x, kernel, g):
      _, pullback = jax.vjp(op, x, kernel.astype(dtype))
      dx, dkernel = pullback(g)
      return dx, jax.lax.psum(dkernel.astype(jnp.float32), axis)

    # check_vma off: the psum makes the kernel gradient the same on every device, which out_specs=P() states.
    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(axis), P(), P(axis)), out_specs=(P(axis), P()),
                         check_vma=False)(x, kernel, g)

  apply.defvjp(forward, backward)
  return apply


def conv_general_dilated(dtype, mesh) -> Callable:
  """A `jax.lax.conv_general_dilated` for nn.Conv(conv_general_dilated=...): see the module doc."""
  def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
           feature_group_count=1, batch_group_count=1, precision=None, preferred_element_type=None):
    op = functools.partial(jax.lax.conv_general_dilated, window_strides=window_strides, padding=padding,
                           lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                           dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                           batch_group_count=batch_group_count, precision=precision,
                           preferred_element_type=preferred_element_type)
    return summed_in_float32(op, dtype, mesh)(lhs, rhs)
  return conv


def dot_general(dtype, mesh) -> Callable:
  """A `jax.lax.dot_general` for nn.Dense(dot_general=...): see the module doc."""
  def dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    op = functools.partial(jax.lax.dot_general, dimension_numbers=dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, **kwargs)
    return summed_in_float32(op, dtype, mesh)(lhs, rhs)
  return dot


def promote_keeping_kernel(inputs, kernel, bias, *, dtype=None, inexact: bool = True):
  """flax's promote_dtype for these layers: the inputs in the compute dtype; the kernel left float32 (the layer's
  op converts it inside its custom gradient), and the bias too: a bias added in float32 gets a float32 gradient,
  which XLA then also sums in float32 (the head's Dense layers; their output is float32, what the BatchNorm
  after them computes in anyway)."""
  (inputs,) = flax_dtypes.promote_dtype(inputs, dtype=dtype, inexact=inexact)
  return inputs, kernel, bias


def layer_options(kind: str, dtype, mesh) -> dict[str, Any]:
  """Keyword arguments for nn.Conv (kind 'conv') or nn.Dense ('dense') in `dtype`: the float32 reduction when
  `mesh` is given and the compute dtype is 16-bit, else nothing (float32 compute reduces in float32 anyway)."""
  if mesh is None or jnp.dtype(dtype) == jnp.float32:
    return {}
  if kind == "conv":
    return dict(conv_general_dilated=conv_general_dilated(dtype, mesh), promote_dtype=promote_keeping_kernel)
  return dict(dot_general=dot_general(dtype, mesh), promote_dtype=promote_keeping_kernel)
