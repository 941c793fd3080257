"""The device mesh, the few shardings DCv2 uses, and moving arrays between the hosts and the mesh.

One mesh axis, `data`, spans every device of every process. Parameters, optimizer state, centroids and the
assignment table are replicated; the batch and the memory bank are split along `data`. Everything else
(which collective goes where) is left to XLA under `jax.jit`. Host to mesh: `local_batch_to_global`; mesh to
host: `to_numpy` and `to_python` (the train loop's control flags and metrics, k-means' table).
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


def to_numpy(tree):
  """Replicated jax arrays in a pytree -> numpy arrays, copied from the devices in one batch (this process's
  first shard: works on every process of a multi-host run)."""
  return jax.device_get(jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree))


def to_python(tree):
  """Replicated jax arrays and numpy values in a pytree -> JSON-ready Python numbers (lists for vectors).

  Every array is copied from its device in one batch (jax.device_get); replicated arrays are read from
  this process's first shard, so this works on every process of a multi-host run.
  """
  return jax.tree.map(_python_leaf, to_numpy(tree))


def _python_leaf(x):
  if isinstance(x, np.ndarray):
    return x.item() if x.ndim == 0 else x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  return x
