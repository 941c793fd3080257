"""The DCv2 train state and the three jitted functions of an epoch: bank init pass, k-means, train step.

All three run under one `jax.jit` each over the device mesh with global arrays: parameters, optimizer
state, centroids and the assignment table replicated; batch and memory bank split on the data axis.
XLA inserts the collectives (BatchNorm statistics, gradient all-reduce, k-means sums).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from dcv2_jax import augment, memory_bank, precision
from dcv2_jax.loss import IGNORE, dcv2_loss
from dcv2_jax.memory_bank import MemoryBank
from dcv2_jax.models import DTYPES, model_from_config
from dcv2_jax.optim import make_optimizer
from dcv2_jax.sharding import batch_sharded, replicated


@struct.dataclass
class TrainState:
  step: jax.Array           # global train step (int32); epoch = step // steps_per_epoch
  params: Any
  batch_stats: Any
  opt_state: Any
  loss_scale: precision.LossScale
  bank: MemoryBank
  centroids: jax.Array      # [H, K, D] from last k-means; not parameters (no gradient into them)
  table: jax.Array          # [H, num_examples] int32 targets by dataset index, -100 = absent


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Everything static that the jitted functions close over."""
  model: Any
  tx: optax.GradientTransformation
  schedule: Any
  steps_per_epoch: int
  num_examples: int
  global_batch: int
  crop_groups: tuple          # ((size, count), ...)
  crops_for_mb: tuple
  num_clusters: tuple
  embedding_dim: int
  temperature: float
  kmeans_iters: int
  kmeans_chunk: int
  empty_clusters: str
  kmeans_dtype: str
  kmeans_sums: str
  kmeans_assign: str
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


def make_spec(config, num_examples: int, steps_per_epoch: int, num_devices=None, local_devices=None) -> StepSpec:
  tx, schedule = make_optimizer(config, steps_per_epoch)
  return StepSpec(
      model=model_from_config(config, num_devices, local_devices), tx=tx, schedule=schedule,
      steps_per_epoch=steps_per_epoch, num_examples=num_examples, global_batch=config.batch_size,
      crop_groups=tuple((int(c[0]), int(c[1])) for c in config.data.crops),
      crops_for_mb=tuple(config.loss.crops_for_mb), num_clusters=tuple(config.loss.num_clusters),
      embedding_dim=int(config.model.head_dims[-1]), temperature=float(config.loss.temperature),
      kmeans_iters=int(config.loss.kmeans_iters), kmeans_chunk=int(config.loss.kmeans_chunk),
      empty_clusters=config.loss.empty_clusters, kmeans_dtype=config.loss.kmeans_dtype,
      kmeans_sums=config.loss.kmeans_sums, kmeans_assign=config.loss.kmeans_assign, seed=int(config.seed),
      augment_cfg=config.augment,
      compute_dtype=DTYPES[config.model.dtype], loss_scale_init=float(config.optim.loss_scale),
      loss_scale_period=int(config.optim.loss_scale_period))


# ----------------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------------
def init_state(spec: StepSpec, key) -> TrainState:
  # Parameters do not depend on the crop sizes: trace one small group only (halves compile time).
  size = min(s for s, _ in spec.crop_groups)
  dummy = [jnp.zeros((spec.model.bn_groups, 1, size, size, 3), jnp.float32)]
  variables = spec.model.init(key, dummy, train=True)
  params = variables["params"]
  k = spec.num_clusters[0]
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


# ----------------------------------------------------------------------------------------------------
# Input: on-device augmentation
# ----------------------------------------------------------------------------------------------------
def prepare_crops(spec: StepSpec, crops, index, epoch, crop_ids=None):
  """uint8 crop groups [B, n, S, S, 3] -> augmented, normalised compute-dtype groups.

  Each crop's randomness comes from (seed, epoch, dataset index, crop number) only, so the crops do not
  depend on the device, worker or process count. crop_ids: the crop numbers of each group's columns.
  """
  keys = augment.crop_keys(spec.seed, epoch, index, spec.num_crops)          # [B, C]
  out, first = [], 0
  for g, x in enumerate(crops):
    b, n = x.shape[:2]
    ids = tuple(range(first, first + n)) if crop_ids is None else crop_ids[g]
    first += n
    flat = x.reshape((b * n,) + x.shape[2:])
    if spec.augment_cfg.where == "device":
      k = keys[:, jnp.asarray(ids)].reshape(b * n)
      y = augment.device_augment(flat, k, spec.augment_cfg, spec.compute_dtype)
    else:
      y = augment.normalize(flat, spec.augment_cfg, spec.compute_dtype)
    out.append(y.reshape(x.shape))
  return out


def targets_for(table, index):
  """[H, B] targets: table columns of the batch's dataset indices; -100 for index -1 (a skipped file)."""
  return jnp.take(table, jnp.where(index >= 0, index, table.shape[1]), axis=1, mode="fill", fill_value=IGNORE)


# ----------------------------------------------------------------------------------------------------
# Train step
# ----------------------------------------------------------------------------------------------------
def train_step(spec: StepSpec, state: TrainState, batch):
  epoch = state.step // spec.steps_per_epoch
  slot = state.step % spec.steps_per_epoch
  index = batch["index"]
  crops = prepare_crops(spec, batch["crops"], index, epoch)
  targets = targets_for(state.table, index)

  def loss_fn(params):
    z, mutated = spec.model.apply({"params": params, "batch_stats": state.batch_stats}, crops, train=True,
                                  mutable=["batch_stats"])
    loss, acc = dcv2_loss(jnp.swapaxes(z, 0, 1), state.centroids, targets, spec.temperature,
                          return_accuracy=True)
    return loss * state.loss_scale.scale, (loss, acc, z, mutated["batch_stats"])

  grads, (loss, acc, z, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  grads = jax.tree.map(lambda g: g / state.loss_scale.scale, grads)
  updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  finite = precision.all_finite(grads)
  loss_scale = state.loss_scale
  if spec.fp16:   # skip the whole update (BN statistics included) on overflow ...
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    # ... but the optimizer's integer step counters advance, so the LR stays schedule(step).
    keep_floats = lambda new, old: jax.tree.map(
        lambda a, b: a if jnp.issubdtype(a.dtype, jnp.integer) else jnp.where(finite, a, b), new, old)
    params, opt_state, batch_stats = (keep(params, state.params), keep_floats(opt_state, state.opt_state),
                                      keep(batch_stats, state.batch_stats))
    loss_scale = precision.adjust(loss_scale, finite, spec.loss_scale_period)

  # The bank gets this step's z of crops_for_mb, computed with the pre-update weights (as the reference).
  # A row with a non-finite z (fp16 overflow) is stored as empty: one NaN row would wreck k-means.
  z_mb = jnp.swapaxes(z[:, jnp.asarray(spec.crops_for_mb)], 0, 1)            # [banks, B, D]
  rows_finite = jnp.all(jnp.isfinite(z_mb), axis=(0, 2))
  bank = memory_bank.write(state.bank, slot, z_mb, jnp.where(rows_finite, index, -1))

  metrics = {"loss": loss, "lr": spec.schedule(state.step), "grads_finite": finite,
             "params_finite": precision.all_finite(params),
             "skipped": jnp.sum(index < 0), "loss_scale": state.loss_scale.scale,   # the scale this step used
             # A SIGTERM on any process (checkpoint.PreemptionNotice): the same value on every process.
             "stop_requested": jnp.max(batch["stop"]) if "stop" in batch else jnp.int32(0)}
  metrics.update({f"target_acc_h{h}": acc[h] for h in range(acc.shape[0])})
  new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                      loss_scale=loss_scale, bank=bank)
  return new, metrics


# ----------------------------------------------------------------------------------------------------
# Memory-bank initial pass (before training, not on resume)
# ----------------------------------------------------------------------------------------------------
def _group_of_crop(spec: StepSpec, crop: int):
  first = 0
  for g, (_, n) in enumerate(spec.crop_groups):
    if crop < first + n:
      return g, crop - first
    first += n
  raise ValueError(f"crop {crop} out of range: there are {first} crops")


def bank_init_step(spec: StepSpec, state: TrainState, batch, slot):
  """No gradient, BN in train mode: each crop of crops_for_mb forwarded on its own, z stored at `slot`."""
  index = batch["index"]
  epoch = jnp.asarray(-1, jnp.int32)          # its own augmentation stream, apart from every training epoch
  zs, batch_stats = [], state.batch_stats
  for crop in spec.crops_for_mb:
    g, col = _group_of_crop(spec, crop)
    x = batch["crops"][g][:, col:col + 1]
    (x,) = prepare_crops(spec, [x], index, epoch, crop_ids=[(crop,)])
    z, mutated = spec.model.apply({"params": state.params, "batch_stats": batch_stats}, [x], train=True,
                                  mutable=["batch_stats"])
    batch_stats = mutated["batch_stats"]
    zs.append(z[:, 0])
  bank = memory_bank.write(state.bank, slot, jnp.stack(zs), index)
  return state.replace(bank=bank, batch_stats=batch_stats)


# ----------------------------------------------------------------------------------------------------
# k-means at the start of every epoch
# ----------------------------------------------------------------------------------------------------
def kmeans_step(spec: StepSpec, state: TrainState, key, shards=None, mesh=None):
  centroids, table, sizes = memory_bank.cluster(
      key, state.bank, spec.num_clusters, spec.kmeans_iters, spec.num_examples,
      crops_for_mb_count=len(spec.crops_for_mb), chunk_size=spec.kmeans_chunk,
      empty_clusters=spec.empty_clusters, shards=shards, compute_dtype=spec.kmeans_dtype, sums=spec.kmeans_sums,
      assign=spec.kmeans_assign, mesh=mesh)
  return state.replace(centroids=centroids, table=table), sizes


# ----------------------------------------------------------------------------------------------------
# Compilation over a mesh
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Compiled:
  init: Any
  train_step: Any
  bank_init_step: Any
  kmeans_step: Any
  state_sharding: Any


def compile_for_mesh(spec: StepSpec, mesh) -> Compiled:
  rep, data = replicated(mesh), batch_sharded(mesh)
  shape = jax.eval_shape(lambda k: init_state(spec, k), jax.random.key(0))
  ss = state_shardings(shape, mesh)
  shards = mesh.devices.size if spec.global_batch % mesh.devices.size == 0 else 1
  return Compiled(
      init=jax.jit(lambda k: init_state(spec, k), out_shardings=ss),
      train_step=jax.jit(lambda s, b: train_step(spec, s, b), in_shardings=(ss, data),
                         out_shardings=(ss, rep), donate_argnums=0),
      bank_init_step=jax.jit(lambda s, b, i: bank_init_step(spec, s, b, i), in_shardings=(ss, data, rep),
                             out_shardings=ss, donate_argnums=0),
      kmeans_step=jax.jit(lambda s, k: kmeans_step(spec, s, k, shards, mesh), in_shardings=(ss, rep),
                          out_shardings=(ss, rep), donate_argnums=0),
      state_sharding=ss)
