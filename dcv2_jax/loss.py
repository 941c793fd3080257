"""DCv2 loss: cross-entropy of every crop against its sample's k-means assignment, per head.

Unlike SwAV there is no swapping between crops: all C crops of sample i share the hard target
assignments[h][dataset_index(i)] computed from last epoch's memory bank. Targets of -100 (sample absent
from that bank) are ignored. Loss and softmax run in float32 whatever the compute dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dcv2_jax.conventions import IGNORE


def head_logits(z, centroids, temperature):
  """z [C,B,D], centroids [H,K,D] -> logits [H,C,B,K] in float32."""
  # HIGHEST: true float32 on GPUs too (the default would be TF32, whose 1e-3 error T=0.1 multiplies by 10);
  # the matmul is tiny next to the trunk.
  return jnp.einsum("cbd,hkd->hcbk", z.astype(jnp.float32), centroids.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST) / temperature


def dcv2_loss(z, centroids, targets, temperature, return_accuracy: bool = False, num_clusters=None):
  """Mean over heads of the mean cross-entropy over non-ignored (crop, sample) rows.

  z: [C, B, D] unit rows, crop-major. centroids: [H, K, D]. targets: [H, B] int, -100 = ignore.
  num_clusters: the clusters of each head when heads differ (centroids padded to the largest K): the padded
  ones take no part in the softmax or the argmax. Returns a scalar (0, with zero gradient, when every row
  is ignored); with return_accuracy also the per-head fraction [H] of non-ignored rows whose argmax equals
  the target.
  """
  logits = head_logits(z, centroids, temperature)                      # [H,C,B,K]
  if num_clusters is not None and min(num_clusters) < logits.shape[-1]:
    real = jnp.arange(logits.shape[-1])[None, :] < jnp.asarray(num_clusters)[:, None]     # [H, K]
    logits = jnp.where(real[:, None, None, :], logits, -jnp.inf)
  valid = targets != IGNORE                                            # [H,B]
  safe = jnp.where(valid, targets, 0)[:, None, :]                      # [H,1,B]
  logz = jax.nn.logsumexp(logits, axis=-1)                             # [H,C,B]
  picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
  mask = jnp.broadcast_to(valid[:, None, :], logz.shape).astype(jnp.float32)
  count = mask.sum(axis=(1, 2))                                        # [H]
  # where(), not a plain product: an ignored row must not carry a NaN/inf into the sum.
  per_head = jnp.where(mask > 0, logz - picked, 0.0).sum(axis=(1, 2)) / jnp.maximum(count, 1.0)
  loss = per_head.mean()
  if not return_accuracy:
    return loss
  hit = (jnp.argmax(logits, axis=-1) == safe) & (mask > 0)
  accuracy = hit.sum(axis=(1, 2)) / jnp.maximum(count, 1.0)
  return loss, accuracy
