"""The DCv2 memory bank and the assignment table built from it.

Layout [banks, steps_per_epoch, global_batch, D], split over devices along the batch axis. Step s of an
epoch writes the z of the crops in crops_for_mb into [:, s] (slots restart at 0 every epoch, so at epoch
end the bank holds the whole epoch). Because the bank is split exactly as the batch is, every device
writes only its own rows: no cross-device traffic. The layout does not depend on the device count, so a
checkpoint restores onto any mesh whose size divides the batch (the bank just re-shards).

For k-means the bank is viewed as rows [banks, N = batch*steps, D] by moving the (split) batch axis in
front of the step axis; that keeps every row on its device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from dcv2_jax import kmeans
from dcv2_jax.loss import IGNORE
from dcv2_jax.sharding import DATA_AXIS


@struct.dataclass
class MemoryBank:
  z: jax.Array        # [banks, steps, B, D] float32
  index: jax.Array    # [steps, B] int32 dataset index of each slot, -1 = empty


def bank_shardings(mesh) -> MemoryBank:
  return MemoryBank(z=NamedSharding(mesh, P(None, None, DATA_AXIS, None)),
                    index=NamedSharding(mesh, P(None, DATA_AXIS)))


def create(num_banks: int, steps: int, batch: int, dim: int) -> MemoryBank:
  return MemoryBank(z=jnp.zeros((num_banks, steps, batch, dim), jnp.float32),
                    index=jnp.full((steps, batch), -1, jnp.int32))


def write(bank: MemoryBank, step_in_epoch, z, index) -> MemoryBank:
  """Store z [banks, B, D] (one row per bank) and the dataset indices [B] at slot row `step_in_epoch`."""
  z = jax.lax.stop_gradient(z).astype(bank.z.dtype)[:, None]
  return MemoryBank(
      z=jax.lax.dynamic_update_slice(bank.z, z, (0, step_in_epoch, 0, 0)),
      index=jax.lax.dynamic_update_slice(bank.index, index.astype(jnp.int32)[None], (step_in_epoch, 0)))


def rows(bank: MemoryBank):
  """(z rows [banks, N, D], index rows [N]) with N = batch * steps; device-local reshapes only."""
  nb, steps, b, d = bank.z.shape
  z = jnp.transpose(bank.z, (0, 2, 1, 3)).reshape(nb, b * steps, d)
  return z, bank.index.T.reshape(b * steps)


def assignment_table(assignments, index, num_examples: int):
  """[H, N] assignments of bank rows -> [H, num_examples] table by dataset index, -100 where absent."""
  h = assignments.shape[0]
  idx = jnp.where(index >= 0, index, num_examples)      # empty slots -> out of range -> dropped
  table = jnp.full((h, num_examples), IGNORE, jnp.int32)
  return table.at[:, idx].set(assignments.astype(jnp.int32), mode="drop")


def cluster(key, bank: MemoryBank, num_clusters, num_iters: int, num_examples: int, *,
            crops_for_mb_count: int, chunk_size: int = 65536, empty_clusters: str = "keep", shards=None,
            precision=None, compute_dtype: str = "float32", sums: str = "scatter", assign: str = "xla", mesh=None):
  """k-means for every head (head h clusters bank h % banks), one after the other as the reference.

  Returns (centroids [H, K, D], table [H, num_examples], cluster sizes [H, K]).
  """
  z, index = rows(bank)
  valid = index >= 0
  centroids, assigns, sizes = [], [], []
  for h, k in enumerate(num_clusters):
    data = z[h % crops_for_mb_count]
    ok = valid & jnp.all(jnp.isfinite(data), axis=-1)     # defensive: a NaN row would poison every centroid
    init = kmeans.init_centroids(jax.random.fold_in(key, h), data, k, ok)
    c, a = kmeans.lloyd(data, init, num_iters, ok, chunk_size=chunk_size, shards=shards,
                        empty_clusters=empty_clusters, precision=precision, compute_dtype=compute_dtype, sums=sums,
                        assign=assign, mesh=mesh)
    centroids.append(c)
    assigns.append(a)
    # -100 -> index k, out of range, dropped (a negative index would wrap around instead).
    sizes.append(jnp.zeros((k,), jnp.int32).at[jnp.where(a >= 0, a, k)].add(1, mode="drop"))
  assigns = jnp.stack(assigns)
  return jnp.stack(centroids), assignment_table(assigns, index, num_examples), jnp.stack(sizes)
