"""What every part of a run agrees on: the markers, the numeric types and the few numeric helpers they share.

Kept free of other project imports, so every module can use it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# A target, assignment or table entry for "no cluster": a sample absent from the memory bank, a padding row, an
# undecodable file. The loss ignores it (PyTorch's ignore_index), k-means counts it nowhere.
IGNORE = -100

# The augmentation "epoch" of the memory bank's initial pass (before epoch 0): its crops (host) and colour ops
# (device) draw from their own stream, apart from every training epoch's. An int32 that numpy's SeedSequence
# accepts (no negative numbers) and no run reaches.
BANK_PASS_EPOCH = 2 ** 31 - 1

# model.dtype: the compute dtype (parameters stay float32).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# model.matmul_precision (and loss.kmeans_precision): "default" lets the backend choose (TF32 for float32 on
# NVIDIA GPUs since Ampere); "highest" is true float32, as the SwAV repo's V100 runs (V100s have no TF32).
PRECISIONS = {"default": None, "highest": jax.lax.Precision.HIGHEST}


def l2_normalize(x, eps: float = 1e-12):
  """x / max(||x||, eps) along the last axis: torch.nn.functional.normalize. Written as x * rsqrt(max(||x||^2,
  eps^2)) so that a zero row has a zero gradient, as torch's, not the NaN of the norm's gradient at 0."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """Whole global batches in an epoch: the last partial batch is dropped, as the published runs do."""
  return num_examples // global_batch if global_batch > 0 else 0
