"""Step 4 of every train step: the DCv2 memory bank, its layout and its writes.

Layout [banks, steps_per_epoch, global_batch, D], split over devices along the batch axis. Step s of an
epoch writes the z of the crops in crops_for_mb into [:, s] (slots restart at 0 every epoch, so at epoch
end the bank holds the whole epoch). Because the bank is split exactly as the batch is, every device
writes only its own rows: no cross-device traffic. The layout does not depend on the device count, so a
checkpoint restores onto any mesh whose size divides the batch (the bank just re-shards).

For k-means (kmeans.py) the bank is viewed as rows [banks, N = batch*steps, D] by moving the (split) batch
axis in front of the step axis; that keeps every row on its device. k-means' assignments of those rows
become the assignment table, by dataset index, that the next epoch's loss reads its targets from.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from dcv2_jax.conventions import IGNORE
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
