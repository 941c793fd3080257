"""The device mesh and the few shardings DCv2 uses.

One mesh axis, `data`, spans every device of every process. Parameters, optimizer state, centroids and the
assignment table are replicated; the batch and the memory bank are split along `data`. Everything else
(which collective goes where) is left to XLA under `jax.jit`.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices (all processes), each process's devices contiguous.

  Auto axes: GSPMD propagates shardings through reshapes (grouped BatchNorm, bank views) by itself.
  """
  devices = jax.devices() if devices is None else list(devices)
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, axis: int = 0) -> NamedSharding:
  """Split dimension `axis` over the data axis, replicate the rest."""
  return NamedSharding(mesh, P(*([None] * axis + [DATA_AXIS])))


def local_batch_to_global(tree, mesh: Mesh):
  """Assemble per-process numpy batches (leading axis = this process's rows) into global jax arrays."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)
