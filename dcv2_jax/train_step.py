"""Step 3 of every epoch, once per batch: the DCv2 train step; and the memory bank's initial pass.

Both take a batch of uint8 crops and run the same forward (on-device augmentation, multi-crop network);
`train_step` then takes the loss against last epoch's k-means, updates the weights and writes this step's
embeddings into the memory bank; `bank_init_step`, before the first epoch of a fresh run, only writes
the bank. Both are jitted over the device mesh by epoch_steps.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct

from dcv2_jax import augment, memory_bank, precision
from dcv2_jax.loss import IGNORE, dcv2_loss
from dcv2_jax.train_state import StepSpec, TrainState


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
  crops = _augment(spec, batch["crops"], index, epoch)
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

  metrics = {"loss": loss, "lr": spec.schedule(state.step), "skipped": jnp.sum(index < 0),
             **{f"target_acc_h{h}": acc[h] for h in range(acc.shape[0])}}
  control = StepControl(params_finite=precision.all_finite(params), grads_finite=finite,
                        loss_scale=state.loss_scale.scale,
                        stop_requested=jnp.max(batch["stop"]) if "stop" in batch else jnp.int32(0))
  new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                      loss_scale=loss_scale, bank=bank)
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
  each crop of crops_for_mb forwarded on its own, its z stored at `slot`."""
  index = batch["index"]
  epoch = jnp.asarray(-1, jnp.int32)          # its own augmentation stream, apart from every training epoch
  zs, batch_stats = [], state.batch_stats
  for crop in spec.crops_for_mb:
    g, col = _group_of_crop(spec, crop)
    (x,) = _augment(spec, [batch["crops"][g][:, col:col + 1]], index, epoch, crop_ids=[(crop,)])
    z, mutated = spec.model.apply({"params": state.params, "batch_stats": batch_stats}, [x], train=True,
                                  mask=index >= 0, mutable=["batch_stats"])
    batch_stats = mutated["batch_stats"]
    zs.append(z[:, 0])
  bank = memory_bank.write(state.bank, slot, jnp.stack(zs), index)
  return state.replace(bank=bank, batch_stats=batch_stats)
