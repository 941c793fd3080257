"""The DCv2 step: what it carries (TrainState), what it closes over (StepSpec, built once from the config), the
train step and the memory bank's initial pass, and how both are compiled over the device mesh (EpochSteps).

    steps = jit_epoch_steps(make_spec(config, num_examples, steps_per_epoch, mesh), mesh)
    state = steps.init(key)                                # fresh TrainState, sharded
    state = steps.bank_init(state, batch, slot)            # memory bank's initial pass (fresh runs)
    state, sizes = steps.kmeans(state, key)                # start of every epoch: kmeans.recluster
    state, metrics, control = steps.train(state, batch)    # every batch: train_step

Every step takes a batch of uint8 crops (or, data.crops_on=device, decoded images and crop boxes: the crops are cut
here, device_crops.py) and runs the same forward (on-device augmentation, multi-crop network);
`train_step` then takes the loss against last epoch's k-means, updates the weights and writes this step's
embeddings into the memory bank; `bank_init_step`, before the first epoch of a fresh run, only writes the bank.
Each program is one `jax.jit` over the mesh with global arrays: parameters, optimizer state, centroids and the
assignment table replicated; batch and memory bank split on the data axis; the state donated (the bank is updated
in place). XLA inserts the collectives (BatchNorm statistics, gradient all-reduce, k-means sums).
`distributed.jit`: in a multi-process run each starts together on every process.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from dcv2_jax import augment, device_crops, kmeans, loss_scale, memory_bank, optim
from dcv2_jax.conventions import BANK_PASS_EPOCH, DTYPES, IGNORE
from dcv2_jax.loss import dcv2_loss
from dcv2_jax.memory_bank import MemoryBank
from dcv2_jax.model import batchnorm
from dcv2_jax.model.multi_crop import DCv2Model, dcv2_model
from dcv2_jax.run import distributed
from dcv2_jax.sharding import batch_sharded, replicated

# ------------------------------------------------------------------------------------------ what a step is


@struct.dataclass
class TrainState:
  """Everything that changes during training; a checkpoint saves exactly this pytree. The memory bank is split
  over the mesh's data axis like the batch, everything else is replicated."""
  step: jax.Array           # global train step (int32); epoch = step // steps_per_epoch
  params: Any
  batch_stats: Any
  opt_state: Any
  loss_scale: loss_scale.LossScale
  bank: MemoryBank
  centroids: jax.Array      # [H, K, D] from last k-means (K the largest head's); not parameters
  table: jax.Array          # [H, num_examples] int32 targets by dataset index, -100 = absent


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Everything static that the step's programs close over, built once from the validated config (make_spec)."""
  model: DCv2Model
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  steps_per_epoch: int
  num_examples: int
  global_batch: int
  crop_groups: tuple          # ((size, count), ...)
  crops_for_mb: tuple
  num_clusters: tuple
  temperature: float
  kmeans_iters: int
  kmeans: kmeans.KMeansSettings
  seed: int
  augment_cfg: Any
  compute_dtype: Any
  scaling: loss_scale.Policy  # float16 only

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
      model=dcv2_model(config, bn_groups, mesh), tx=tx, schedule=schedule, steps_per_epoch=steps_per_epoch,
      num_examples=num_examples, global_batch=config.batch_size,
      crop_groups=tuple((int(c[0]), int(c[1])) for c in config.data.crops),
      crops_for_mb=tuple(loss_cfg.crops_for_mb), num_clusters=tuple(loss_cfg.num_clusters),
      temperature=float(loss_cfg.temperature), kmeans_iters=int(loss_cfg.kmeans_iters),
      kmeans=kmeans.KMeansSettings.from_config(loss_cfg), seed=int(config.seed), augment_cfg=config.augment,
      compute_dtype=DTYPES[config.model.dtype],
      scaling=loss_scale.Policy(float(config.optim.loss_scale), int(config.optim.loss_scale_period)))


def init_state(spec: StepSpec, key) -> TrainState:
  # Parameters do not depend on the crop sizes: trace one small group only (halves compile time).
  size = min(s for s, _ in spec.crop_groups)
  dummy = [jnp.zeros((spec.model.bn_groups, 1, size, size, 3), jnp.float32)]
  variables = spec.model.init(key, dummy, train=True)
  params = variables["params"]
  k, dim = max(spec.num_clusters), spec.model.head_dims[-1]     # heads of fewer clusters are padded (kmeans.py)
  return TrainState(
      step=jnp.zeros([], jnp.int32), params=params, batch_stats=variables["batch_stats"],
      opt_state=spec.tx.init(params),
      loss_scale=loss_scale.LossScale.create(spec.scaling.initial if spec.fp16 else 1.0),
      bank=memory_bank.create(len(spec.crops_for_mb), spec.steps_per_epoch, spec.global_batch, dim),
      centroids=jnp.zeros((len(spec.num_clusters), k, dim), jnp.float32),
      table=jnp.full((len(spec.num_clusters), spec.num_examples), IGNORE, jnp.int32))


def state_shardings(state_shape: TrainState, mesh) -> TrainState:
  """Everything replicated but the memory bank, which is split like the batch."""
  rep = replicated(mesh)
  return jax.tree.map(lambda _: rep, state_shape).replace(bank=memory_bank.bank_shardings(mesh))


def trunk_variables(state: TrainState) -> dict:
  """The trunk's {'params', 'batch_stats'}: what evaluation and export use."""
  return {"params": state.params["trunk"], "batch_stats": state.batch_stats["trunk"]}


# ------------------------------------------------------------------------------------------ the steps

@struct.dataclass
class StepControl:
  """What the train loop acts on, apart from what it logs: is the run still finite, did a process get a
  SIGTERM. Replicated scalars, fetched with the metrics in one transfer."""
  params_finite: jax.Array
  grads_finite: jax.Array
  loss_scale: jax.Array       # the scale this step used (1 unless float16)
  stop_requested: jax.Array   # a SIGTERM on any process (preemption.PreemptionNotice): the same everywhere


def targets_for(table, index):
  """[H, B] targets: table columns of the batch's dataset indices; -100 for index -1 (a skipped file)."""
  return jnp.take(table, jnp.where(index >= 0, index, table.shape[1]), axis=1, mode="fill", fill_value=IGNORE)


def _augment(spec: StepSpec, crops, index, epoch, crop_ids=None):
  return augment.augment_crops(crops, index, epoch, spec.augment_cfg, seed=spec.seed,
                               out_dtype=spec.compute_dtype, crop_ids=crop_ids)


def train_step(spec: StepSpec, state: TrainState, batch):
  """-> (state after the step, metrics to log, StepControl)."""
  epoch = state.step // spec.steps_per_epoch
  slot = state.step % spec.steps_per_epoch
  index = batch["index"]
  crops = _augment(spec, device_crops.crops_of(batch, spec.crop_groups), index, epoch)
  targets = targets_for(state.table, index)

  # An undecodable sample (index -1, zero crops) takes no part: not in BatchNorm's statistics (mask), not in
  # the loss (target -100), not in the memory bank (slot left empty).
  def loss_fn(params):
    z, mutated = spec.model.apply({"params": params, "batch_stats": state.batch_stats}, crops, train=True,
                                  mask=index >= 0, mutable=["batch_stats"])
    loss, acc = dcv2_loss(jnp.swapaxes(z, 0, 1), state.centroids, targets, spec.temperature,
                          return_accuracy=True, num_clusters=spec.num_clusters)
    return loss * state.loss_scale.scale, (loss, acc, z, mutated["batch_stats"])

  grads, (loss, acc, z, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  grads = jax.tree.map(lambda g: g / state.loss_scale.scale, grads)
  updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  finite = loss_scale.all_finite(grads)
  scale = state.loss_scale
  if spec.fp16:   # skip the whole update (BN statistics included) on overflow ...
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    # ... but the optimizer's integer step counters advance, so the LR stays schedule(step).
    keep_floats = lambda new, old: jax.tree.map(
        lambda a, b: a if jnp.issubdtype(a.dtype, jnp.integer) else jnp.where(finite, a, b), new, old)
    params, opt_state, batch_stats = (keep(params, state.params), keep_floats(opt_state, state.opt_state),
                                      keep(batch_stats, state.batch_stats))
    scale = loss_scale.adjust(scale, finite, spec.scaling.period)

  # The bank gets this step's z of crops_for_mb, computed with the pre-update weights (as the reference).
  # A row with a non-finite z (fp16 overflow) is stored as empty: one NaN row would wreck k-means.
  z_mb = jnp.swapaxes(z[:, jnp.asarray(spec.crops_for_mb)], 0, 1)            # [banks, B, D]
  rows_finite = jnp.all(jnp.isfinite(z_mb), axis=(0, 2))
  bank = memory_bank.write(state.bank, slot, z_mb, jnp.where(rows_finite, index, -1))

  metrics = {"loss": loss, "lr": spec.schedule(state.step), "skipped": jnp.sum(index < 0),
             **{f"target_acc_h{h}": acc[h] for h in range(acc.shape[0])}}
  control = StepControl(params_finite=loss_scale.all_finite(params), grads_finite=finite,
                        loss_scale=state.loss_scale.scale,
                        stop_requested=jnp.max(batch["stop"]) if "stop" in batch else jnp.int32(0))
  new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                      loss_scale=scale, bank=bank)
  return new, metrics, control


def _group_of_crop(spec: StepSpec, crop: int):
  first = 0
  for g, (_, n) in enumerate(spec.crop_groups):
    if crop < first + n:
      return g, crop - first
    first += n
  raise ValueError(f"crop {crop} out of range: there are {first} crops")


def bank_init_step(spec: StepSpec, state: TrainState, batch, slot):
  """The memory bank's initial pass (a fresh run, before epoch 0's k-means): no gradient, BN in train mode,
  each crop of crops_for_mb forwarded on its own, its z stored at `slot`. Its augmentation is drawn as in
  BANK_PASS_EPOCH (the pipeline's crops too), apart from every training epoch's. Returns (state, the batch's
  undecodable samples): a small output the trainer waits on, one step late, as it does the train step's metrics."""
  index = batch["index"]
  epoch = jnp.asarray(BANK_PASS_EPOCH, jnp.int32)
  zs, batch_stats = [], state.batch_stats
  for crop in spec.crops_for_mb:
    g, col = _group_of_crop(spec, crop)
    cut = (device_crops.cut_one(batch, crop, spec.crop_groups[g][0]) if "image" in batch
           else batch["crops"][g][:, col:col + 1])
    (x,) = _augment(spec, [cut], index, epoch, crop_ids=[(crop,)])
    z, mutated = spec.model.apply({"params": state.params, "batch_stats": batch_stats}, [x], train=True,
                                  mask=index >= 0, mutable=["batch_stats"])
    batch_stats = mutated["batch_stats"]
    zs.append(z[:, 0])
  bank = memory_bank.write(state.bank, slot, jnp.stack(zs), index)
  return state.replace(bank=bank, batch_stats=batch_stats), jnp.sum(index < 0)


# ------------------------------------------------------------------------------------------ compiled

@dataclasses.dataclass(frozen=True)
class EpochSteps:
  init: Callable          # key -> TrainState
  bank_init: Callable     # (state, batch, slot) -> (state, undecodable samples)
  kmeans: Callable        # (state, key) -> (state, cluster sizes [H, K])
  train: Callable         # (state, batch) -> (state, metrics, StepControl)
  member_scores: Callable  # state -> (index, cluster, score) of every bank row in head 0 (cluster pictures)
  state_sharding: TrainState


def jit_epoch_steps(spec: StepSpec, mesh) -> EpochSteps:
  """The programs of an epoch, each jitted over `mesh` with the shardings of the module doc."""
  rep, data = replicated(mesh), batch_sharded(mesh)
  shape = jax.eval_shape(functools.partial(init_state, spec), jax.random.key(0))
  ss = state_shardings(shape, mesh)
  jit = distributed.jit
  recluster = functools.partial(kmeans.recluster, num_clusters=spec.num_clusters, num_iters=spec.kmeans_iters,
                                settings=spec.kmeans, mesh=mesh)
  return EpochSteps(
      init=jit(functools.partial(init_state, spec), out_shardings=ss),
      bank_init=jit(functools.partial(bank_init_step, spec), in_shardings=(ss, data, rep),
                    out_shardings=(ss, rep), donate_argnums=0),
      kmeans=jit(recluster, in_shardings=(ss, rep), out_shardings=(ss, rep), donate_argnums=0),
      train=jit(functools.partial(train_step, spec), in_shardings=(ss, data), out_shardings=(ss, rep, rep),
                donate_argnums=0),
      member_scores=jit(lambda s: kmeans.member_scores(s.bank, s.centroids, s.table), in_shardings=(ss,),
                        out_shardings=rep),
      state_sharding=ss)
