"""What a DCv2 run is on the devices: one state pytree, and the static spec its jitted functions close over.

The state holds everything that changes during training (weights, optimizer, loss scale, the memory bank,
last k-means' centroids and assignment table); checkpoints save exactly this pytree. Its sharding: the
memory bank is split over the mesh's data axis like the batch, everything else is replicated.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from dcv2_jax import batchnorm, memory_bank, models, optim, precision
from dcv2_jax.kmeans import KMeansSettings
from dcv2_jax.loss import IGNORE
from dcv2_jax.memory_bank import MemoryBank
from dcv2_jax.sharding import replicated


@struct.dataclass
class TrainState:
  step: jax.Array           # global train step (int32); epoch = step // steps_per_epoch
  params: Any
  batch_stats: Any
  opt_state: Any
  loss_scale: precision.LossScale
  bank: MemoryBank
  centroids: jax.Array      # [H, K, D] from last k-means (K the largest head's); not parameters
  table: jax.Array          # [H, num_examples] int32 targets by dataset index, -100 = absent


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Everything static that the jitted functions close over (built once from the validated config)."""
  model: models.DCv2Model
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  steps_per_epoch: int
  num_examples: int
  global_batch: int
  crop_groups: tuple          # ((size, count), ...)
  crops_for_mb: tuple
  num_clusters: tuple
  embedding_dim: int
  temperature: float
  kmeans_iters: int
  kmeans: KMeansSettings
  seed: int
  augment_cfg: Any
  compute_dtype: Any
  loss_scale_init: float
  loss_scale_period: int

  @property
  def num_crops(self) -> int:
    return sum(n for _, n in self.crop_groups)

  @property
  def fp16(self) -> bool:
    return self.compute_dtype == jnp.float16


def make_spec(config, num_examples: int, steps_per_epoch: int, mesh) -> StepSpec:
  """The spec of a resolved, validated config (config.resolve, config.validate) for the device `mesh` (which
  may be an abstract one: the GPU compile check builds the spec for a topology of GPUs this machine lacks)."""
  num_devices = mesh.devices.size
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  bn_groups = batchnorm.num_groups(config.model.sync_bn, config.batch_size, num_devices, local_devices)
  tx, schedule = optim.make_optimizer(config, steps_per_epoch)
  loss_cfg = config.loss
  return StepSpec(
      model=models.dcv2_model(config, bn_groups, mesh), tx=tx, schedule=schedule, steps_per_epoch=steps_per_epoch,
      num_examples=num_examples, global_batch=config.batch_size,
      crop_groups=tuple((int(c[0]), int(c[1])) for c in config.data.crops),
      crops_for_mb=tuple(loss_cfg.crops_for_mb), num_clusters=tuple(loss_cfg.num_clusters),
      embedding_dim=int(config.model.head_dims[-1]), temperature=float(loss_cfg.temperature),
      kmeans_iters=int(loss_cfg.kmeans_iters), kmeans=KMeansSettings.from_config(loss_cfg), seed=int(config.seed),
      augment_cfg=config.augment, compute_dtype=models.DTYPES[config.model.dtype],
      loss_scale_init=float(config.optim.loss_scale), loss_scale_period=int(config.optim.loss_scale_period))


def init_state(spec: StepSpec, key) -> TrainState:
  # Parameters do not depend on the crop sizes: trace one small group only (halves compile time).
  size = min(s for s, _ in spec.crop_groups)
  dummy = [jnp.zeros((spec.model.bn_groups, 1, size, size, 3), jnp.float32)]
  variables = spec.model.init(key, dummy, train=True)
  params = variables["params"]
  k = max(spec.num_clusters)          # heads of fewer clusters are padded (kmeans.cluster_heads)
  return TrainState(
      step=jnp.zeros([], jnp.int32), params=params, batch_stats=variables["batch_stats"],
      opt_state=spec.tx.init(params),
      loss_scale=precision.LossScale.create(spec.loss_scale_init if spec.fp16 else 1.0),
      bank=memory_bank.create(len(spec.crops_for_mb), spec.steps_per_epoch, spec.global_batch,
                              spec.embedding_dim),
      centroids=jnp.zeros((len(spec.num_clusters), k, spec.embedding_dim), jnp.float32),
      table=jnp.full((len(spec.num_clusters), spec.num_examples), IGNORE, jnp.int32))


def state_shardings(state_shape: TrainState, mesh) -> TrainState:
  """Everything replicated but the memory bank, which is split like the batch."""
  rep = replicated(mesh)
  return jax.tree.map(lambda _: rep, state_shape).replace(bank=memory_bank.bank_shardings(mesh))


def trunk_variables(state: TrainState) -> dict:
  """The trunk's {'params', 'batch_stats'}: what evaluation and export use."""
  return {"params": state.params["trunk"], "batch_stats": state.batch_stats["trunk"]}
