"""The DCv2 trainer. `train_and_evaluate` reads as a run goes:

    run = start_run(config, workdir)        # devices, data, model and jitted steps; everything checked first
    state = resume(run)                     # the newest checkpoint that reads back, or
          = fill_memory_bank(run, init)     #   a fresh state and the bank's initial pass
    per epoch:
      state = cluster(run, state, epoch)    # 1. k-means of every head, then the report (clusters/report.py)
      state = train_epoch(run, state, ...)  # 2-5. batches -> train step -> bank write -> checkpoints
      live_knn(run, state, ...)             #    every eval_every_epochs
    final_evaluation(run, state)            # kNN + linear probe on the eval split (eval_at_end)

Resume: the newest complete checkpoint in <workdir>/checkpoints is restored, and training continues from
its step; the data position is the step itself (epoch = step // steps_per_epoch). Everything random derives
from (seed, epoch, step or dataset index), so a resumed run computes what the uninterrupted run would have
(bit-identical on CPU).
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from dcv2_jax import config as config_lib
from dcv2_jax import data, evaluation
from dcv2_jax.clusters.report import ClusterReport
from dcv2_jax.conventions import steps_per_epoch
from dcv2_jax.model import batchnorm
from dcv2_jax.model.multi_crop import crops_per_trunk_pass
from dcv2_jax.model.trunk import TrunkArch, trunk_apply_fn
from dcv2_jax.run import checkpoint, distributed
from dcv2_jax.run.metric_writer import MetricWriter, Progress, format_eta
from dcv2_jax.run.preemption import PreemptionNotice
from dcv2_jax.sharding import make_mesh, to_numpy, to_python
from dcv2_jax.train_step import EpochSteps, StepSpec, TrainState, jit_epoch_steps, make_spec, trunk_variables

# Device crops: warn (once per process start) when more than this share of an epoch's images are larger than the
# canvas (data.canvas_size) and downscaled before their crops are cut.
DOWNSCALED_WARNING = 0.1
# A whole epoch's loss within 1% of ln K (every cluster equally likely: the features carry no information about the
# clusters) is a collapse: the run warns.
COLLAPSE_MARGIN = 0.01


class NonFiniteLoss(RuntimeError):
  pass


class DeviceOutOfMemory(RuntimeError):
  pass


class BadData(RuntimeError):
  """More of the data than data.max_bad_fraction does not decode."""


class Preempted(Exception):
  """The scheduler's SIGTERM arrived: a checkpoint of `step` was saved and training stopped."""

  def __init__(self, step: int):
    super().__init__(f"preempted at step {step}")
    self.step = step


def itstime(count: int, every: int, last: int | None = None) -> bool:
  """Whether an action due every `every` (steps, epochs) is due after `count` of them: each multiple of `every`,
  and `last` (the end of an epoch, of the run) whatever `every` says."""
  return (every > 0 and count % every == 0) or count == last


# ------------------------------------------------------------------------------------------ the run

@dataclasses.dataclass
class Run:
  """What every part of a run needs, built once by `start_run`."""
  config: ml_collections.ConfigDict      # resolved and validated
  workdir: str
  mesh: Mesh
  spec: StepSpec
  steps: EpochSteps                      # the jitted init / bank_init / kmeans / train
  pipeline: data.Pipeline
  checkpoints: checkpoint.Checkpoints
  writer: MetricWriter
  cluster_report: ClusterReport
  preemption: PreemptionNotice
  root_key: jax.Array
  bad_samples_total: int = 0             # samples skipped as undecodable since the run began (all epochs)
  warned_downscaled: bool = False        # device crops: the warning about images larger than the canvas, given

  @property
  def steps_per_epoch(self) -> int:
    return self.spec.steps_per_epoch

  @property
  def total_steps(self) -> int:
    return self.config.num_epochs * self.spec.steps_per_epoch

  def key(self, purpose: int, *folds: int) -> jax.Array:
    """The key of one use (0: initial weights, 1: k-means, folded with the epoch), the same on every process."""
    key = jax.random.fold_in(self.root_key, purpose)
    for x in folds:
      key = jax.random.fold_in(key, x)
    return key


def start_run(config, workdir: str, devices=None) -> Run:
  """Devices, data, model and jitted steps for `config` in `workdir`: every setting is checked (and the
  run refused with one message) before anything is compiled."""
  # -------------------------------------------------------------------------------------- devices
  mesh = make_mesh(devices)
  num_devices = mesh.devices.size
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  config, notes = config_lib.resolve(config, num_devices, jax.default_backend())
  logging.info("dcv2-jax: %d process(es), %d device(s) (%s), workdir %s", jax.process_count(), num_devices,
               jax.devices()[0].platform, workdir)
  for note in notes:
    logging.info("config: %s", note)

  # ----------------------------------------------------------------------------------------- data
  source = data.make_source(config.data)
  num_examples = len(source)
  spe = steps_per_epoch(num_examples, config.batch_size)
  config_lib.validate(config, num_examples, spe, num_devices, jax.process_count())
  check_eval_split(config)
  pipeline = data.Pipeline(config, source=source)
  logging.info("data: %d samples, global batch %d, %d steps/epoch, %d epochs (%d steps)", num_examples,
               config.batch_size, spe, config.num_epochs, config.num_epochs * spe)
  if max(config.loss.num_clusters) > num_examples / 10:
    logging.warning("loss.num_clusters=%s: more than a tenth of the %d samples (clusters of under 10 samples "
                    "each, many will be empty); see docs/small_data.md on choosing K",
                    tuple(config.loss.num_clusters), num_examples)
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # --------------------------------------------------------------------- model and jitted steps
  spec = make_spec(config, num_examples, spe, mesh)
  logging.info("model: %s", batchnorm.describe_groups(config.model.sync_bn, config.batch_size, num_devices,
                                                      local_devices, crops_per_trunk_pass(config.data.crops)))
  writer = MetricWriter(workdir, enabled=is_main)
  report = ClusterReport(workdir, spec.num_clusters, config.keep_assignments, config.log_cluster_images,
                         source.labels(), source, writer, writes_files=is_main)
  return Run(config=config, workdir=workdir, mesh=mesh, spec=spec, steps=jit_epoch_steps(spec, mesh),
             pipeline=pipeline, checkpoints=checkpoint.Checkpoints(workdir, config.keep_checkpoints),
             writer=writer, cluster_report=report, preemption=PreemptionNotice(), root_key=jax.random.key(config.seed))


def check_eval_split(config) -> None:
  """An evaluation asked for (eval_at_end, eval_every_epochs) needs a labelled eval split with samples: found
  missing now, not after the last epoch."""
  data_cfg = config.data
  if not data_cfg.eval_split or not (config.eval_at_end or config.eval_every_epochs):
    return
  try:
    size = len(data.make_source(data_cfg, data_cfg.eval_split))
  except (OSError, ValueError) as e:
    raise config_lib.ConfigError(f"the evaluation split data.eval_split={data_cfg.eval_split!r} cannot be read: "
                                 f"{e} (or set --config.data.eval_split='' to train without evaluation)") from None
  if size == 0:
    raise config_lib.ConfigError(f"the evaluation split data.eval_split={data_cfg.eval_split!r} is empty")


def train_and_evaluate(config, workdir: str, devices=None) -> dict:
  """Trains (or resumes) a DCv2 run in `workdir` on `devices` (default: all); returns the last summary."""
  run = start_run(config, workdir, devices)
  try:
    try:
      # A SIGTERM from here until the last save is written saves the next step and stops (Preempted).
      with run.preemption:
        state = resume(run)
        if state is None:
          state = fill_memory_bank(run, run.steps.init(run.key(0)))
        state = train_epochs(run, state)
    finally:
      # On a crash too: let an in-flight save complete, stop the data workers.
      run.checkpoints.close()
      run.pipeline.close()
    summary = {"step": int(to_python(state.step))}
    if run.config.eval_at_end and run.config.data.eval_split:
      summary["eval"] = final_evaluation(run, state)
    return summary
  except Preempted as p:
    logging.warning("preempted: the checkpoint of step %d is saved in %s; run the same command to resume",
                    p.step, run.checkpoints.directory)
    run.writer.write({"step": p.step, "preempted": True})
    return {"step": p.step, "preempted": True}
  except Exception as e:  # pylint: disable=broad-except
    oom = explain_out_of_memory(e, run.config, run.mesh.devices.size)
    if oom is None:
      raise
    raise oom from e
  finally:
    run.writer.close()


# ------------------------------------------------------------------------------ state: resume or fill

def resume(run: Run) -> TrainState | None:
  """The state of the newest checkpoint that reads back (None for a fresh run)."""
  shape = jax.eval_shape(run.steps.init, run.key(0))
  restored = run.checkpoints.restore(
      checkpoint.abstract_like(shape, run.steps.state_sharding),
      check=lambda meta: checkpoint.TrainRecord.from_json(meta).check_same_data(
          run.spec.num_examples, run.config.batch_size, run.workdir))
  if restored is None:
    run.checkpoints.warn_if_disk_too_small(shape, run.config.keep_checkpoints)
    return None
  state, meta = restored
  record = checkpoint.TrainRecord.from_json(meta)
  run.bad_samples_total = record.bad_samples_total
  logging.info("resumed from step %d (epoch %d)", record.step, record.step // run.steps_per_epoch)
  # The stability NMI of the next k-means compares with the table in the state (this epoch's, or mid-epoch the
  # one this epoch trains on).
  run.cluster_report.previous = to_numpy(state.table)
  return state


def fill_memory_bank(run: Run, state: TrainState) -> TrainState:
  """The memory bank's initial pass, before epoch 0's k-means: an epoch of forward passes over epoch 0's
  samples (crops and colour ops of their own), no training; minutes at ImageNet scale, so with progress
  and ETA."""
  spe, batch = run.steps_per_epoch, run.config.batch_size
  t0 = time.time()
  progress = Progress(spe, 0, batch, batch * len(run.spec.crops_for_mb))
  bad, pending = 0, None
  with data.device_prefetch(run.pipeline.bank_pass(), run.mesh) as batches:
    for slot, b in enumerate(batches):
      state, skipped = run.steps.bank_init(state, b, jnp.asarray(slot, jnp.int32))
      # One step queued, as in train_epoch: waiting for the previous step keeps the batches on the device bounded
      # (a fast input would otherwise queue a step, and its batch, per batch ahead).
      bad += 0 if pending is None else to_python(pending)
      pending = skipped
      if itstime(slot + 1, run.config.log_every_steps) and slot + 1 < spe:
        r = progress.report(slot + 1)
        logging.info("memory bank: %d/%d steps, %.0f img/s, ETA %s", slot + 1, spe, r["img_per_s"],
                     format_eta(r["eta_s"]))
  bad += 0 if pending is None else to_python(pending)
  logging.info("memory bank filled: %d rows in %.1fs", spe * batch - bad, time.time() - t0)
  check_bad_data(run, bad, spe * batch, "in the memory bank's initial pass")
  return state


def check_bad_data(run: Run, bad: int, samples: int, when: str) -> None:
  """Stops the run (BadData) when more than data.max_bad_fraction of `samples` did not decode."""
  limit = run.config.data.max_bad_fraction
  if samples and bad / samples > limit:
    examples = ", ".join(f"{run.pipeline.source.describe(i)} ({reason.split(':')[0]})"
                         for i, reason in list(run.pipeline.bad_samples.items())[:3])
    raise BadData(f"{bad} of {samples} samples ({100 * bad / samples:.1f}%) {when} could not be decoded, more than "
                  f"data.max_bad_fraction={limit}; for example {examples}. Repair or remove those files, or raise "
                  "--config.data.max_bad_fraction")


# ------------------------------------------------------------------------------------------- epochs

def train_epochs(run: Run, state: TrainState) -> TrainState:
  step = int(to_python(state.step))
  while step < run.total_steps:
    epoch, step_in_epoch = divmod(step, run.steps_per_epoch)
    if step_in_epoch == 0:          # resumed mid-epoch: that epoch's centroids are in the state
      state = cluster(run, state, epoch)
    state, step = train_epoch(run, state, epoch, step_in_epoch)
    every = run.config.eval_every_epochs
    if every and run.config.data.eval_split and itstime(epoch + 1, every, last=run.config.num_epochs):
      live_knn(run, state, epoch, step)
  return state


def cluster(run: Run, state: TrainState, epoch: int) -> TrainState:
  """Step 1: k-means of every head on last epoch's bank, then the report (clusters/report.py)."""
  spec = run.spec
  valid_rows = int(to_python(jnp.sum(state.bank.index >= 0)))
  if valid_rows < max(spec.num_clusters):
    raise config_lib.ConfigError(
        f"epoch {epoch}: the memory bank holds only {valid_rows} readable samples, fewer than "
        f"loss.num_clusters={spec.num_clusters} (unreadable files are skipped); lower num_clusters")
  t0 = time.time()
  state, sizes = run.steps.kmeans(state, run.key(1, epoch))
  table, sizes = to_numpy((state.table, sizes))
  kmeans_s = time.time() - t0       # includes the compilation in the first epoch of a process
  scores = to_numpy(run.steps.member_scores(state)) if run.config.log_cluster_images else None
  run.cluster_report.epoch(epoch, epoch * run.steps_per_epoch, table, sizes, kmeans_s, scores)
  return state


@dataclasses.dataclass
class EpochTally:
  """What an epoch's steps returned, fetched one step late (so the host never stalls the device) and acted on:
  a non-finite run stops, a SIGTERM on any process asks to stop; losses and skipped samples add up."""
  config: ml_collections.ConfigDict
  losses: list = dataclasses.field(default_factory=list)
  bad: int = 0
  stop: bool = False
  pending: tuple | None = None            # (global step before it, metrics, StepControl) not fetched yet

  def settle(self) -> dict | None:
    """Fetches the pending step's outputs (one transfer), checks them; returns its metrics (None if none)."""
    if self.pending is None:
      return None
    at, metrics, control = self.pending
    metrics, control = to_python((metrics, control))
    self.pending = None
    stop_now = check_step(self.config, at, metrics["loss"], control)
    if stop_now and not self.stop:
      logging.warning("SIGTERM received (on at least one process): saving a checkpoint, then stopping")
    self.stop = self.stop or stop_now
    self.losses.append(metrics["loss"])
    self.bad += metrics["skipped"]
    if self.config.model.dtype == "float16":
      metrics["loss_scale"] = control.loss_scale
    return metrics


def train_epoch(run: Run, state: TrainState, epoch: int, first_step: int):
  """Steps 2-5 for one epoch from `first_step`: batches -> train step (which writes the bank) -> logs and
  checkpoints. Returns (state, global step).

  Only a state whose step was checked finite is saved (the pending step is settled first). A preemption notice
  (in a fetched step's control flags, so seen by every process at the same step) saves the current step and
  raises Preempted.
  """
  config, spe = run.config, run.steps_per_epoch
  step, epoch_end = epoch * spe + first_step, (epoch + 1) * spe
  progress = Progress(run.total_steps, step, config.batch_size, config.batch_size * run.spec.num_crops)
  tally = EpochTally(config)
  downscaled_before = run.pipeline.downscaled
  with data.device_prefetch(run.pipeline.iterate(epoch, first_step), run.mesh) as batches:
    for batch in batches:
      state, metrics, control = run.steps.train(state, run.preemption.tag(batch))
      tally.settle()                        # the previous step's, while this one runs
      tally.pending = (step, metrics, control)
      step += 1
      if itstime(step, config.log_every_steps, last=epoch_end):
        record = {"step": step, "epoch": epoch, **tally.settle(), **progress.report(step)}
        run.writer.write(record)
        logging.info("step %d/%d epoch %d loss %.4f lr %.4g %.0f img/s ETA %s", step, run.total_steps, epoch,
                     record["loss"], record["lr"], record["img_per_s"], format_eta(record["eta_s"]))
      if tally.stop or itstime(step, config.checkpoint_every_steps, last=epoch_end):
        tally.settle()
        run.checkpoints.save(step, state, dataclasses.asdict(checkpoint.TrainRecord(
            step, run.spec.num_examples, config.batch_size, config.to_json_best_effort(),
            run.bad_samples_total + tally.bad)))
      if tally.stop:
        raise Preempted(step)
  tally.settle()
  run.bad_samples_total += tally.bad
  epoch_loss = float(np.mean(tally.losses)) if tally.losses else None
  record = {"step": step, "epoch": epoch, "epoch_loss": epoch_loss, "bad_samples": tally.bad,
            "bad_samples_total": run.bad_samples_total}
  if config.data.crops_on == "device":      # images larger than the canvas, downscaled first (all processes)
    downscaled = distributed.sum_over_processes(run.pipeline.downscaled - downscaled_before)
    record["downscaled_samples"] = downscaled
    seen = len(tally.losses) * config.batch_size
    if downscaled > DOWNSCALED_WARNING * seen and not run.warned_downscaled:
      run.warned_downscaled = True
      logging.warning("epoch %d: %d of %d images were larger than the %d px canvas and were downscaled before "
                      "their crops were cut (fewer pixels in the small crops): raise --config.data.canvas_size",
                      epoch, downscaled, seen, config.data.canvas_size)
  run.writer.write(record)
  uniform = float(np.mean(np.log(run.spec.num_clusters)))
  if epoch >= 1 and epoch_loss is not None and epoch_loss >= (1 - COLLAPSE_MARGIN) * uniform:
    logging.warning("epoch %d: the loss %.4f sits at ln K = %.4f (every cluster equally likely): the features do "
                    "not separate the clusters, a collapse? Check the LR and the augmentation (docs/small_data.md)",
                    epoch, epoch_loss, uniform)
  check_bad_data(run, tally.bad, len(tally.losses) * config.batch_size, f"in epoch {epoch}")
  return state, step


def check_step(config, step: int, loss: float, control) -> bool:
  """Stops the run (NonFiniteLoss) on non-finite weights or loss; returns whether a SIGTERM asks to stop.
  `step` is the global step before the checked update (so the message counts it as step + 1)."""
  if not control.params_finite:
    raise NonFiniteLoss(f"the weights became non-finite at step {step + 1} (loss {loss}); the run stops here "
                        "and the last checkpoint (written before this step) is kept. Lower the LR.")
  if not np.isfinite(loss) or not control.grads_finite:
    # float16: an overflow skips the step and halves the loss scale; give up only once the scale this step
    # used was already 1. Other dtypes: no second chance.
    if config.model.dtype != "float16" or control.loss_scale <= 1.0:
      raise NonFiniteLoss(f"loss {loss} (gradients {'finite' if control.grads_finite else 'non-finite'}) at step "
                          f"{step + 1}; the run stops here and the last checkpoint (written before this step) "
                          "is kept. Lower the LR or use float32/bfloat16.")
  return bool(control.stop_requested)


def explain_out_of_memory(error: Exception, config, num_devices: int) -> DeviceOutOfMemory | None:
  """A DeviceOutOfMemory that says which setting to lower, if `error` is XLA running out of device memory;
  None for any other error."""
  if not isinstance(error, jax.errors.JaxRuntimeError) or "out of memory" not in str(error).lower():
    return None
  per_device = config.batch_size // num_devices
  crops = " + ".join(f"{int(n)}x{int(s)}" for s, n, *_ in config.data.crops)
  return DeviceOutOfMemory(
      f"device memory ran out with {per_device} samples ({crops} crops each) per device: global batch "
      f"{config.batch_size} on {num_devices} device(s), model.dtype={config.model.dtype}. Lower the batch per "
      f"device, e.g. --config.per_device_batch_size={max(1, per_device // 2)} (the published recipes use 64 per "
      f"GPU; the LR follows the global batch by the linear rule). A different global batch needs a new "
      f"--workdir. If it ran out in k-means, lower --config.loss.kmeans_chunk instead. The largest batch that fits "
      f"a card, planned without a GPU: python -m dcv2_jax.bench compile --config <this config> --gpu "
      f"a100-80gb,h100,h200 --devices {num_devices} --max_batch. XLA said: {str(error)[:500]}")


# ------------------------------------------------------------------------------------ evaluation

def live_knn(run: Run, state: TrainState, epoch: int, step: int) -> float:
  """eval_every_epochs: the weighted kNN top-1 of the trunk's features (eval view, eval_max_samples of each
  split), logged as knn_top1, so a run shows whether its features improve long before it ends."""
  config = run.config
  t0 = time.time()
  mean, std = config_lib.normalization(config)
  res = evaluation.evaluate_trunk(trunk_apply_fn(TrunkArch.from_config(config.model)), trunk_variables(state),
                                  config.data, protocol=evaluation.protocol_for(config.data), mesh=run.mesh,
                                  mean=mean, std=std, linear=False, progress=False,
                                  max_samples=config.eval_max_samples)
  if "knn_top1" not in res:
    logging.warning("epoch %d: no kNN (%s)", epoch, res.get("skipped"))
    return float("nan")
  run.writer.write({"step": step, "epoch": epoch, "knn_top1": res["knn_top1"], "knn_s": time.time() - t0})
  logging.info("epoch %d kNN top-1 %.4f (%d train / %d eval samples, %s px %s, %.1fs)", epoch, res["knn_top1"],
               res["num_train"], res["num_test"], res["image_size"], res["view"], time.time() - t0)
  return res["knn_top1"]


def final_evaluation(run: Run, state: TrainState) -> dict:
  """kNN + linear probe of the trunk's features on data.split (train) / data.eval_split (test), with the
  protocol the evaluate command picks for this data; also the network at initialisation when
  eval_random_init (the baseline the learned features should beat)."""
  config = run.config
  apply_fn = trunk_apply_fn(TrunkArch.from_config(config.model))
  mean, std = config_lib.normalization(config)
  protocol = evaluation.protocol_for(config.data)
  networks = {"learned": trunk_variables(state)}
  if config.eval_random_init:     # the same network at initialisation (deterministic in the seed)
    networks["random_init"] = trunk_variables(run.steps.init(run.key(0)))
  results = {}
  for name, variables in networks.items():
    results[name] = evaluation.evaluate_trunk(apply_fn, variables, config.data, protocol=protocol, mesh=run.mesh,
                                              mean=mean, std=std)
    logging.info("eval %s: kNN top-1 %.4f, linear top-1 %s", name, results[name].get("knn_top1", float("nan")),
                 results[name].get("linear_top1"))
  run.writer.write({"step": int(to_python(state.step)), "eval": results})
  return results
