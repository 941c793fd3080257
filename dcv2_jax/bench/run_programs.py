"""A run's jitted programs for a config on any device mesh, and inputs for them: abstract ones (shapes and
shardings, to compile for GPUs this machine does not have) or synthetic ones on the devices (to time them here).

The programs are the trainer's own (train_step.make_spec + train_step.jit_epoch_steps), so what is compiled or
timed is what a run executes.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dcv2_jax import config as config_lib
from dcv2_jax.conventions import steps_per_epoch
from dcv2_jax.data.pipeline import crop_groups, train_batch_shapes
from dcv2_jax.run import checkpoint
from dcv2_jax.sharding import batch_sharded, local_batch_to_global, replicated
from dcv2_jax.train_step import EpochSteps, StepSpec, jit_epoch_steps, make_spec

# Training-set sizes of the datasets the recipes name: the memory bank's size, and the steps of an epoch, are
# needed before any data is read.
DATASET_SIZES = {"imagenet2012": 1_281_167, "imagenet100": 126_689, "cifar10": 50_000, "cifar100": 50_000,
                 "stl10": 5_000, "digits": 1_438}


def dataset_size(config, given: int = 0) -> int:
  """`given` if > 0, else the size of the config's dataset if it is one of DATASET_SIZES, else ValueError."""
  if given > 0:
    return given
  name = "digits" if config.data.source == "digits" else config.data.name
  if name not in DATASET_SIZES:
    raise ValueError(f"--num_examples: the size of {name!r} is not known here; give it")
  return DATASET_SIZES[name]


@dataclasses.dataclass(frozen=True)
class RunPrograms:
  config: ml_collections.ConfigDict      # resolved for the mesh and validated
  mesh: jax.sharding.Mesh
  spec: StepSpec
  steps: EpochSteps


def build(config, mesh, num_examples: int) -> RunPrograms:
  """The programs of a run of `config` on `mesh` (every device of it; possibly GPUs of a topology this machine
  lacks) over a dataset of num_examples: the config is resolved and validated as the trainer does."""
  num_devices = mesh.devices.size
  config, _ = config_lib.resolve(config, num_devices, mesh.devices.flat[0].platform)
  spe = steps_per_epoch(num_examples, config.batch_size)
  config_lib.validate(config, num_examples, spe, num_devices,
                      len({d.process_index for d in mesh.devices.flat}))
  spec = make_spec(config, num_examples, spe, mesh)
  return RunPrograms(config, mesh, spec, jit_epoch_steps(spec, mesh))


def abstract_key(mesh) -> jax.ShapeDtypeStruct:
  key = jax.eval_shape(lambda: jax.random.key(0))
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated(mesh))


def abstract_state(programs: RunPrograms):
  """The TrainState's shapes, dtypes and shardings (nothing allocated)."""
  return checkpoint.abstract_like(jax.eval_shape(programs.steps.init, jax.random.key(0)),
                                  programs.steps.state_sharding)


def batch_shapes(config) -> dict:
  """The global training batch the train step receives: the pipeline's arrays plus the preemption flag
  (preemption.PreemptionNotice.tag adds `stop`)."""
  shapes = train_batch_shapes(crop_groups(config.data.crops), config.batch_size, config.data.crops_on,
                              config.data.canvas_size)
  return dict(shapes, stop=((config.batch_size,), np.int32))


def _is_shape_dtype(x) -> bool:
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def abstract_batch(programs: RunPrograms) -> dict:
  rows = batch_sharded(programs.mesh)
  return jax.tree.map(lambda sd: jax.ShapeDtypeStruct(sd[0], sd[1], sharding=rows), batch_shapes(programs.config),
                      is_leaf=_is_shape_dtype)


def synthetic_batch(programs: RunPrograms, seed: int = 0) -> dict:
  """Random uint8 crops (or images, for device crops) and indices 0..B-1, as global arrays on the mesh (each
  process makes its rows)."""
  rng = np.random.default_rng(seed)
  processes = jax.process_count()

  def local(sd):
    shape, dtype = (sd[0][0] // processes,) + sd[0][1:], sd[1]
    return rng.integers(0, 256, shape, dtype=np.uint8) if dtype == np.uint8 else np.zeros(shape, dtype)

  batch = jax.tree.map(local, batch_shapes(programs.config), is_leaf=_is_shape_dtype)
  batch["index"] = np.arange(batch["index"].shape[0], dtype=np.int32)
  if "boxes" in batch:        # device crops: each crop the whole canvas, a full-size image
    canvas = batch["image"].shape[1]
    batch["image_size"][:] = canvas
    batch["boxes"][:] = np.asarray([0, 0, canvas, canvas], np.float32)
  return local_batch_to_global(batch, programs.mesh)


def synthetic_state(programs: RunPrograms, seed: int = 0):
  """A fresh state whose centroids and assignment table are random (so the loss sees real targets)."""
  state = programs.steps.init(jax.random.key(seed))
  rng = np.random.default_rng(seed)
  centroids = rng.normal(size=state.centroids.shape).astype(np.float32)
  centroids /= np.linalg.norm(centroids, axis=-1, keepdims=True)
  table = rng.integers(0, min(programs.spec.num_clusters), state.table.shape, dtype=np.int32)
  return state.replace(centroids=jax.device_put(jnp.asarray(centroids), state.centroids.sharding),
                       table=jax.device_put(jnp.asarray(table), state.table.sharding))
