"""The DCv2 trainer: one function that reads top to bottom in named sections.

  config + devices -> data -> model/optimizer/jitted steps -> state (resume by default) ->
  memory-bank initial pass (fresh runs) -> epochs [k-means, cluster health, train steps, checkpoints] ->
  final evaluation.

Resume: the newest complete checkpoint in <workdir>/checkpoints is restored, and training continues
from its step. Everything random derives from (seed, epoch, step or dataset index), so a resumed run
computes what the uninterrupted run would have (bit-identical on CPU).
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dcv2_jax import checkpoint, cluster_metrics, data
from dcv2_jax import config as config_lib
from dcv2_jax import train_step as ts
from dcv2_jax.logging_utils import MetricWriter, Progress, format_eta, to_python
from dcv2_jax.sharding import make_mesh


class NonFiniteLoss(RuntimeError):
  pass


class DeviceOutOfMemory(RuntimeError):
  pass


class Preempted(Exception):
  """The scheduler's SIGTERM arrived: a checkpoint of `step` was saved and training stopped."""

  def __init__(self, step: int):
    super().__init__(f"preempted at step {step}")
    self.step = step


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
      f"--workdir. If it ran out in k-means, lower --config.loss.kmeans_chunk instead. XLA said: "
      f"{str(error)[:500]}")


def _labels_of(source):
  labels = getattr(source, "labels", None)
  labels = labels() if callable(labels) else labels
  return None if labels is None else np.asarray(labels)


def _trunk_apply(config):
  from dcv2_jax.models import ResNet
  trunk = ResNet(config.model.depth, config.model.width, config.model.base_width, jnp.float32,
                 bn_eps=config.model.bn_eps)
  return jax.jit(lambda v, x: trunk.apply(v, x, train=False))


def _trunk_variables(state):
  return {"params": state.params["trunk"], "batch_stats": state.batch_stats["trunk"]}


def _save_assignments(workdir, epoch, table, keep):
  folder = os.path.join(workdir, "assignments")
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"epoch_{epoch:04d}.npz")
  np.savez_compressed(path + ".tmp.npz", assignments=table, index=np.arange(table.shape[1], dtype=np.int32))
  os.replace(path + ".tmp.npz", path)
  if keep > 0:
    for old in sorted(f for f in os.listdir(folder) if f.startswith("epoch_"))[:-keep]:
      os.remove(os.path.join(folder, old))


def train_and_evaluate(config, workdir: str, devices=None) -> dict:
  """Trains (or resumes) a DCv2 run in `workdir` on `devices` (default: all); returns the last summary."""
  # ---------------------------------------------------------------------------------------- devices
  is_main = jax.process_index() == 0
  mesh = make_mesh(devices)
  num_devices = mesh.devices.size
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  config, notes = config_lib.resolve(config, num_devices)
  writer = MetricWriter(workdir, enabled=is_main)
  logging.info("dcv2-jax: %d process(es), %d device(s) (%s), workdir %s", jax.process_count(),
               num_devices, jax.devices()[0].platform, workdir)
  for note in notes:
    logging.info("config: %s", note)

  # ------------------------------------------------------------------------------------------- data
  pipeline = data.Pipeline(config)
  spe, n_examples = pipeline.steps_per_epoch, pipeline.num_examples
  config_lib.validate(config, n_examples, spe, num_devices, jax.process_count())
  labels = _labels_of(pipeline.source)
  total_steps = config.num_epochs * spe
  logging.info("data: %d samples, global batch %d, %d steps/epoch, %d epochs (%d steps)", n_examples,
               config.batch_size, spe, config.num_epochs, total_steps)
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # ------------------------------------------------------------------------- model and jitted steps
  spec = ts.make_spec(config, n_examples, spe, num_devices, local_devices)
  compiled = ts.compile_for_mesh(spec, mesh)
  apply_trunk = _trunk_apply(config)

  # ------------------------------------------------------------------- state: resume by default
  ckpts = checkpoint.Checkpoints(workdir, config.keep_checkpoints)
  root = jax.random.key(config.seed)
  shape = jax.eval_shape(lambda k: ts.init_state(spec, k), root)
  restored = ckpts.restore(checkpoint.abstract_like(shape, compiled.state_sharding))
  if restored is not None:
    state, meta = restored
    if (meta["num_examples"], meta["global_batch"]) != (n_examples, config.batch_size):
      raise config_lib.ConfigError(
          f"{workdir} holds a run with {meta['num_examples']} samples and global batch {meta['global_batch']}; "
          f"this config has {n_examples} and {config.batch_size}. Use a new workdir.")
    logging.info("resumed from step %d (epoch %d)", int(meta["step"]), int(meta["step"]) // spe)
  else:
    state = None

  # finally: on a crash too, let an in-flight save complete and stop the workers. A SIGTERM from here until
  # the last save is written (the scheduler's notice) saves the next step and stops: PreemptionNotice.
  preempted_at = None
  with checkpoint.PreemptionNotice() as notice:
    try:
      if state is None:
        # ---------------------------------------------------------- memory-bank initial pass
        state = compiled.init(jax.random.fold_in(root, 0))
        t0 = time.time()
        # An epoch of forward passes before the first step (minutes at ImageNet scale): progress and ETA.
        progress = Progress(spe, 0, config.batch_size, config.batch_size * len(spec.crops_for_mb))
        with data.device_prefetch(pipeline.iterate(config.num_epochs), mesh) as batches:  # never trained on
          for slot, batch in enumerate(batches):
            state = compiled.bank_init_step(state, batch, jnp.asarray(slot, jnp.int32))
            if (slot + 1) % config.log_every_steps == 0 and slot + 1 < spe:
              jax.block_until_ready(state.bank.index)
              r = progress.report(slot + 1)
              logging.info("memory bank: %d/%d steps, %.0f img/s, ETA %s", slot + 1, spe, r["img_per_s"],
                           format_eta(r["eta_s"]))
        jax.block_until_ready(state.bank.z)
        logging.info("memory bank filled: %d rows in %.1fs", spe * config.batch_size, time.time() - t0)

      # --------------------------------------------------------------------------------- epochs
      state, step = _train_epochs(config, workdir, state, compiled, spec, pipeline, ckpts, writer, mesh, labels,
                                  root, is_main, notice)
    except Preempted as p:
      preempted_at = p.step
    except Exception as e:  # pylint: disable=broad-except
      oom = explain_out_of_memory(e, config, num_devices)
      if oom is None:
        raise
      raise oom from e
    finally:
      ckpts.close()
      pipeline.close()
  if preempted_at is not None:
    logging.warning("preempted: the checkpoint of step %d is saved in %s; run the same command to resume",
                    preempted_at, ckpts.directory)
    writer.write({"step": preempted_at, "preempted": True})
    writer.close()
    return {"step": preempted_at, "preempted": True}
  summary = {"step": step}

  # ------------------------------------------------------------------------------ final evaluation
  if config.eval_at_end and config.data.eval_split:
    from dcv2_jax import evaluate
    norm = dict(mean=tuple(config.augment.mean), std=tuple(config.augment.std), mesh=mesh)
    results = {"learned": evaluate.evaluate_features(apply_trunk, _trunk_variables(state), config.data, **norm)}
    if config.eval_random_init:     # the same network at initialisation (deterministic in the seed)
      random_init = _trunk_variables(compiled.init(jax.random.fold_in(root, 0)))
      results["random_init"] = evaluate.evaluate_features(apply_trunk, random_init, config.data, **norm)
    for name, r in results.items():
      logging.info("eval %s: kNN top-1 %.4f, linear top-1 %s", name, r.get("knn_top1", float("nan")),
                   r.get("linear_top1"))
    writer.write({"step": step, "eval": results})
    summary["eval"] = results
  writer.close()
  return to_python(summary)


def _train_epochs(config, workdir, state, compiled, spec, pipeline, ckpts, writer, mesh, labels, root, is_main,
                  notice):
  """k-means at each epoch start, then the epoch's train steps, logging and checkpoints."""
  spe, n_examples = pipeline.steps_per_epoch, pipeline.num_examples
  total_steps = config.num_epochs * spe
  step = int(to_python(state.step))
  prev_table = np.asarray(state.table.addressable_data(0)) if step else None
  while step < total_steps:
    epoch, first = divmod(step, spe)

    # --- k-means on last epoch's bank (skipped when resuming mid-epoch: centroids are in the state)
    if first == 0:
      valid_rows = int(to_python(jnp.sum(state.bank.index >= 0)))
      if valid_rows < max(spec.num_clusters):
        raise config_lib.ConfigError(
            f"epoch {epoch}: the memory bank holds only {valid_rows} readable samples, fewer than "
            f"loss.num_clusters={spec.num_clusters} (unreadable files are skipped); lower num_clusters")
      t0 = time.time()
      state, sizes = compiled.kmeans_step(state, jax.random.fold_in(jax.random.fold_in(root, 1), epoch))
      jax.block_until_ready(state.table)
      kmeans_s = time.time() - t0       # includes the compilation in the first epoch of a process
      table = np.asarray(state.table.addressable_data(0))
      health = cluster_metrics.cluster_health(table, spec.num_clusters, prev_table, labels)
      prev_table = table
      if is_main:
        _save_assignments(workdir, epoch, table, config.keep_assignments)
      writer.write({"step": step, "epoch": epoch, "kmeans_s": kmeans_s, "clusters": health})
      logging.info("epoch %d k-means %.2fs: empty clusters %s, size entropy %s%s", epoch, kmeans_s,
                   health["empty_clusters"], [round(x, 3) for x in health["size_entropy"]],
                   f", NMI(labels) {[round(x, 3) for x in health['nmi_labels']]}" if "nmi_labels" in health else "")

    # --- train steps
    progress = Progress(total_steps, step, config.batch_size, config.batch_size * spec.num_crops)
    with data.device_prefetch(pipeline.iterate(epoch, first), mesh) as batches:
      state, step, losses = _train_steps(config, state, compiled, batches, step, epoch, spe, n_examples,
                                         progress, ckpts, writer, notice)
    writer.write({"step": step, "epoch": epoch, "epoch_loss": float(np.mean(losses)) if losses else None})
  return state, step


def _train_steps(config, state, compiled, batches, step, epoch, spe, n_examples, progress, ckpts, writer, notice):
  """One epoch's steps. Each step's metrics are checked one step late, so the host never stalls the device,
  except before a checkpoint: only a state whose step was checked finite is saved. A preemption notice
  (seen in a checked step's metrics, so by every process at the same step) saves the current step and
  raises Preempted."""
  total_steps = config.num_epochs * spe
  losses, pending, stop = [], None, False

  def check():
    nonlocal pending, stop
    loss, stop_requested = _check(pending, config)
    losses.append(loss)
    if stop_requested and not stop:
      logging.warning("SIGTERM received (on at least one process): saving a checkpoint, then stopping")
    stop, pending = stop or stop_requested, None

  for batch in batches:
    state, metrics = compiled.train_step(state, notice.tag(batch))
    if pending is not None:
      check()
    pending = (step, metrics)
    step += 1
    if step % config.log_every_steps == 0 or step % spe == 0:
      check()
      record = {"step": step, "epoch": epoch, **to_python(metrics), **progress.report(step)}
      record.pop("stop_requested")
      writer.write(record)
      logging.info("step %d/%d epoch %d loss %.4f lr %.4g %.0f img/s ETA %s", step, total_steps, epoch,
                   record["loss"], record["lr"], record["img_per_s"], format_eta(record["eta_s"]))
    if stop or step % config.checkpoint_every_steps == 0 or step % spe == 0:
      if pending is not None:
        check()
      ckpts.save(step, state, {"step": step, "num_examples": n_examples, "global_batch": config.batch_size,
                               "data": {"epoch": step // spe, "step": step % spe},
                               "config": config.to_json_best_effort()})
    if stop:
      raise Preempted(step)
  if pending is not None:
    check()
  return state, step, losses


def _check(pending, config):
  """(loss, stop requested) of a step; a non-finite loss stops the run (its checkpoint is never written)."""
  step, metrics = pending
  loss = float(to_python(metrics["loss"]))
  if not bool(to_python(metrics["params_finite"])):
    raise NonFiniteLoss(f"the weights became non-finite at step {step + 1} (loss {loss}); the run stops here "
                        "and the last checkpoint (written before this step) is kept. Lower the LR.")
  grads_finite = bool(to_python(metrics["grads_finite"]))
  if not np.isfinite(loss) or not grads_finite:
    # float16: an overflow skips the step and halves the loss scale; give up only once the scale this step
    # used was already 1. Other dtypes: no second chance.
    if config.model.dtype != "float16" or float(to_python(metrics["loss_scale"])) <= 1.0:
      raise NonFiniteLoss(f"loss {loss} (gradients {'finite' if grads_finite else 'non-finite'}) at step "
                          f"{step + 1}; the run stops here and the last checkpoint (written before this step) "
                          "is kept. Lower the LR or use float32/bfloat16.")
  return loss, bool(to_python(metrics["stop_requested"]))
