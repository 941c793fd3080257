"""The published linear evaluation (the SwAV repo's eval_linear): a Linear layer on the frozen trunk, trained
on augmented crops.

Train: RandomResizedCrop 224 (scale 0.08-1) + horizontal flip, the trunk in eval mode (BatchNorm running
statistics, no gradient), Linear(features, classes) initialised N(0, 0.01) / 0, cross-entropy, SGD momentum
0.9, weight decay 1e-6, batch 256, 100 epochs, LR 0.3 cosine-annealed per epoch to 0 (protocol.py).
Validation: Resize 256, CentreCrop 224, top-1 / top-5, evaluated after every epoch.

The data path is the training pipeline's (grain; the crop cut on the CPU, or on the GPU as training's
data.crops_on=auto would; flip and normalisation on the device) with one crop per image and the colour
operations off. Runs resume by default: <out> holds an orbax checkpoint
of the Linear layer and its optimizer after every epoch, and the same call continues from it. Metrics:
<out>/metrics.jsonl, one line per epoch.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from dcv2_jax import augment, data, device_crops
from dcv2_jax import config as config_lib
from dcv2_jax import sharding as shd
from dcv2_jax.evaluation.features import extract_split
from dcv2_jax.evaluation.linear_probe import init_linear, top_k_accuracy
from dcv2_jax.evaluation.protocol import linear_protocol, lr_at_epoch, sgd_without_lr
from dcv2_jax.run import checkpoint, distributed
from dcv2_jax.run.metric_writer import MetricWriter, format_eta


def pipeline_config(data_cfg, protocol, mean, std) -> ml_collections.ConfigDict:
  """A training-pipeline config: one RandomResizedCrop per image; flip and normalisation only."""
  c = config_lib.base_config()
  c.data = ml_collections.ConfigDict(data_cfg.to_dict())
  c.data.crops = ((int(protocol.crop_size), 1, float(protocol.crop_scale[0]), float(protocol.crop_scale[1])),)
  # Where the crop is cut and its canvas follow this protocol's crop and this machine, not the training run's.
  c.data.crops_on, c.data.canvas_size = "auto", 0
  c.batch_size, c.num_epochs, c.seed = int(protocol.batch_size), int(protocol.epochs), int(protocol.seed)
  a = c.augment
  a.where, a.flip_p, a.jitter_p, a.grayscale_p, a.blur_p = "device", float(protocol.flip_p), 0.0, 0.0, 0.0
  a.mean, a.std = tuple(mean), tuple(std)
  return c


def masked_cross_entropy(logits, labels, ok):
  """Mean cross-entropy over the rows where ok (undecodable samples carry index -1: not ok); 0 if none."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(ok, labels, 0))
  return jnp.sum(jnp.where(ok, ce, 0.0)) / jnp.maximum(jnp.sum(ok), 1)


def protocol_problems(protocol, stop_after_epoch=None) -> list[str]:
  problems = [f"{k}={protocol[k]} must be > 0" for k in ("epochs", "batch_size", "eval_every_epochs", "crop_size")
              if protocol[k] <= 0]
  if not 0 < protocol.crop_scale[0] <= protocol.crop_scale[1] <= 1:
    problems.append(f"crop_scale={tuple(protocol.crop_scale)}: need 0 < min <= max <= 1")
  if stop_after_epoch is not None and stop_after_epoch <= 0:
    problems.append(f"stop_after_epoch={stop_after_epoch} must be > 0")
  return problems


def train_linear(apply_fn, variables, data_cfg, out_dir: str, protocol=None, *, mean, std, mesh=None,
                 stop_after_epoch: int | None = None) -> dict:
  """Trains (or resumes) the Linear layer in `out_dir`; returns the last epoch's record (val_top1 of the
  last evaluation and val_top1_best over all of them, as the SwAV repo reports).

  apply_fn(variables, float32 normalised NHWC images) -> pooled features (dcv2_jax.load_trunk gives both).
  stop_after_epoch: stop once that many epochs are done (a job with a time limit); the same call resumes.
  """
  cfg = linear_protocol() if protocol is None else protocol
  problems = protocol_problems(cfg, stop_after_epoch)
  if problems:
    raise config_lib.ConfigError("linear evaluation: " + "; ".join(problems))
  last = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch)
  ckpts = checkpoint.Checkpoints(out_dir, keep=2)
  meta = ckpts.restore_meta()
  if meta is not None:
    saved = {k: meta["protocol"][k] for k in ("epochs", "batch_size", "lr", "seed")}
    if saved != {k: cfg[k] for k in saved}:
      ckpts.close()
      raise config_lib.ConfigError(f"{out_dir} holds a linear eval with {saved}; this one has "
                                   f"{ {k: cfg[k] for k in saved} }. Use another --out (or the same settings).")
    if meta["epoch"] >= last:                     # nothing left to do: no data, no features
      ckpts.close()
      return meta["record"]

  mesh = shd.make_mesh() if mesh is None else mesh
  is_main = jax.process_index() == 0
  pcfg = pipeline_config(data_cfg, cfg, mean, std)
  pipeline = data.Pipeline(pcfg)
  if pipeline.num_classes is None:
    ckpts.close()
    raise config_lib.ConfigError(f"linear evaluation needs labels: data source {data_cfg.source!r} has no classes")
  if pipeline.steps_per_epoch == 0:
    ckpts.close()
    raise config_lib.ConfigError(f"linear evaluation: {pipeline.num_examples} samples, fewer than one batch of "
                                 f"{cfg.batch_size}; lower --batch_size")
  spe, num_classes = pipeline.steps_per_epoch, int(pipeline.num_classes)
  variables = jax.device_put(variables, shd.replicated(mesh))

  # ------------------------------------------------------------------------------ validation features
  # The trunk is frozen: validation features are extracted once, and every evaluation is one matmul.
  val_feats, val_labels, _ = extract_split(apply_fn, variables, data_cfg, data_cfg.eval_split,
                                           image_size=int(cfg.crop_size), view=config_lib.eval_view(data_cfg)[1],
                                           mesh=mesh, mean=mean, std=std)
  feature_dim = int(val_feats.shape[1])
  val_feats = jax.device_put(val_feats, shd.replicated(mesh))

  # ------------------------------------------------------------------------------ Linear layer, optimizer
  tx = sgd_without_lr(cfg)
  params = init_linear(jax.random.key(cfg.seed), feature_dim, num_classes)
  state = jax.device_put((params, tx.init(params)), shd.replicated(mesh))
  first_epoch, record = 0, {}
  if meta is not None:
    state, meta = ckpts.restore(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
    first_epoch, record = int(meta["epoch"]), meta["record"]
    logging.info("linear eval: resumed after epoch %d", first_epoch)

  def step(state, variables, batch, epoch):
    params, opt_state = state
    groups = ((int(cfg.crop_size), 1),)
    (crops,) = augment.augment_crops(device_crops.crops_of(batch, groups), batch["index"], epoch, pcfg.augment,
                                     seed=cfg.seed, out_dtype=jnp.float32)
    feats = jax.lax.stop_gradient(apply_fn(variables, crops[:, 0]))
    loss_fn = lambda p: masked_cross_entropy(feats @ p["kernel"] + p["bias"], batch["label"], batch["index"] >= 0)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    lr = lr_at_epoch(cfg, epoch)
    params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
    return (params, opt_state), loss

  step = distributed.jit(step, donate_argnums=0, out_shardings=(shd.replicated(mesh), shd.replicated(mesh)))
  writer = MetricWriter(out_dir, enabled=is_main)
  try:
    t_start = time.time()
    for epoch in range(first_epoch, last):
      # -------------------------------------------------------------------------- one epoch
      t0, losses = time.time(), []
      with data.device_prefetch(pipeline.iterate(epoch, 0), mesh) as batches:
        for batch in batches:
          state, loss = step(state, variables, batch, jnp.int32(epoch))
          losses.append(loss)
      best = record.get("val_top1_best")
      record = {"epoch": epoch + 1, "step": (epoch + 1) * spe, "loss": float(np.mean(jax.device_get(losses))),
                "lr": float(lr_at_epoch(cfg, epoch)), "epoch_s": time.time() - t0}
      # -------------------------------------------------------------------------- evaluation, checkpoint
      if (epoch + 1) % cfg.eval_every_epochs == 0 or epoch + 1 == cfg.epochs:
        top1, top5 = top_k_accuracy(state[0], val_feats, val_labels, min(5, num_classes))
        best = top1 if best is None else max(best, top1)
        record.update(val_top1=top1, val_top5=top5, val_rows=int(len(val_labels)))
      if best is not None:
        record["val_top1_best"] = best
      ckpts.save(epoch + 1, state, {"epoch": epoch + 1, "record": record, "protocol": cfg.to_dict()})
      eta = (time.time() - t_start) / (epoch + 1 - first_epoch) * (cfg.epochs - epoch - 1)
      writer.write(record)
      logging.info("linear eval epoch %d/%d loss %.4f lr %.4g%s (%.0fs, ETA %s)", epoch + 1, cfg.epochs,
                   record["loss"], record["lr"],
                   f" val top-1 {record['val_top1']:.4f} top-5 {record['val_top5']:.4f}" if "val_top1" in record
                   else "", record["epoch_s"], format_eta(eta))
  finally:
    ckpts.close()
    pipeline.close()
    writer.close()
  return record
