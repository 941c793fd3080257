"""Nearest-centroid assignment as one fused GPU kernel (Pallas, Triton backend): the scores stay on chip.

Why our own kernel: XLA runs the assignment as a matmul that writes the [rows, K] score matrix to device
memory and a second kernel that reads it back for the argmax. For the bank at ImageNet scale that is
1,281,167 x 3000 x 4 bytes = 15 GB written and read per pass, 33 passes for 3 heads x 11 assignment steps:
on one H100 (about 3 TB/s) about 0.3 s of pure memory traffic, most of the 0.5 s k-means budget. This
kernel keeps a block of rows on chip, walks the centroids block by block, and keeps only a running
(best score, first argmax) per row, the flash-attention pattern with max in place of softmax. It reads the
bank once from device memory and writes 8 bytes a row. Every block of rows reads all centroids again
(1.5 MB in float32, from L2): 10,000 blocks of 128 rows re-read 15 GB per pass, so larger `block_rows`
cut that traffic; `python -m dcv2_jax.bench assign` compares block configurations on the GPU.

`nearest(x, centroids)` gives `argmax(x @ centroids.T)` and `max(...)` for finite inputs: ties go to the
lowest index (jnp.argmax's rule: the first maximum inside a block, a strictly better score to move to a
later block). Unlike jnp.argmax, a NaN score never wins (callers mask non-finite rows anyway). On a
backend other than GPU it runs in Pallas' interpreter (for tests; slow).

The kernel is written for Pallas' Triton backend, which JAX 0.11 deprecated for removal. Where that backend
is missing, `unavailable_reason()` says so and k-means falls back to the XLA assignment (kmeans.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:
  from jax.experimental.pallas import triton as pl_triton
except ImportError as e:   # a JAX whose Pallas no longer ships the Triton backend
  pl_triton, _TRITON_MISSING = None, f"this JAX ({jax.__version__}) has no Pallas Triton backend: {e}"
else:
  _TRITON_MISSING = None


def unavailable_reason(platform: str | None = None) -> str | None:
  """None if `nearest` can run on `platform` (default: the default backend): compiled by Triton on GPU,
  interpreted elsewhere."""
  return _TRITON_MISSING if (platform or jax.default_backend()) == "gpu" else None


def _kernel(x_ref, c_ref, assign_ref, best_ref, *, num_clusters: int, block_k: int, precision):
  x = x_ref[...]                                               # [block_rows, D], loaded once
  rows = x.shape[0]

  def visit_block(j, carry):
    best, assign = carry
    c = c_ref[pl.ds(j * block_k, block_k), :]                  # [block_k, D]
    s = jax.lax.dot_general(x, c, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)  # [block_rows, block_k]
    col = j * block_k + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    s = jnp.where(col < num_clusters, s, -jnp.inf)             # padding centroids never win
    block_best = jnp.max(s, axis=1)
    block_arg = jnp.argmax(s, axis=1).astype(jnp.int32) + j * block_k
    better = block_best > best                                 # strict: an equal later score keeps the first
    return jnp.where(better, block_best, best), jnp.where(better, block_arg, assign)

  init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.int32))
  best, assign = jax.lax.fori_loop(0, c_ref.shape[0] // block_k, visit_block, init)
  assign_ref[...] = assign
  best_ref[...] = best


@functools.partial(jax.jit, static_argnames=("block_rows", "block_k", "precision", "num_warps", "num_stages",
                                             "interpret"))
def nearest(x, centroids, *, block_rows: int = 128, block_k: int = 128, precision=None, num_warps: int = 8,
            num_stages: int = 2, interpret: bool | None = None):
  """(assignments [N] int32, best scores [N] float32) of rows x [N, D] against centroids [K, D].

  The dot takes the inputs' dtype (float32: TF32 on tensor cores at the default precision, as XLA's
  matmul; bfloat16) and accumulates in float32. Block sizes are powers of two, as Triton's loads need; rows,
  clusters and D are padded with zeros to fit (zero columns change no dot product). interpret: None = off on
  a GPU backend; callers that compile for devices other than the default backend's (the GPU compile check on
  a CPU-only machine) say which.
  """
  for name, v in (("block_rows", block_rows), ("block_k", block_k)):
    if v < 16 or v & (v - 1):
      raise ValueError(f"{name}={v}: the kernel needs a power of two >= 16 (Triton's loads and dots)")
  n, d = x.shape
  k = centroids.shape[0]
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  centroids = centroids.astype(x.dtype)
  n_pad = -(-n // block_rows) * block_rows
  k_pad = -(-k // block_k) * block_k
  d_pad = max(16, 1 << max(0, (d - 1).bit_length()))          # tensor-core dots need >= 16
  x = jnp.pad(x, ((0, n_pad - n), (0, d_pad - d)))
  centroids = jnp.pad(centroids, ((0, k_pad - k), (0, d_pad - d)))
  d = d_pad
  if not interpret and pl_triton is None:
    raise RuntimeError(_TRITON_MISSING)
  params = None if interpret else pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  assign, best = pl.pallas_call(
      functools.partial(_kernel, num_clusters=k, block_k=block_k, precision=precision),
      out_shape=(jax.ShapeDtypeStruct((n_pad,), jnp.int32), jax.ShapeDtypeStruct((n_pad,), jnp.float32)),
      grid=(n_pad // block_rows,),
      in_specs=[pl.BlockSpec((block_rows, d), lambda i: (i, 0)), pl.BlockSpec((k_pad, d), lambda i: (0, 0))],
      out_specs=[pl.BlockSpec((block_rows,), lambda i: (i,)), pl.BlockSpec((block_rows,), lambda i: (i,))],
      compiler_params=params, interpret=interpret, name="kmeans_nearest",
  )(x, centroids)
  return assign[:n], best[:n]
