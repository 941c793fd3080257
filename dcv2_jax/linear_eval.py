"""Linear evaluation as published (the SwAV repo's eval_linear): a Linear layer trained on the frozen trunk.

    python -m dcv2_jax.linear_eval --workdir /runs/dcv2_2crops          # weights and data from the run
    python -m dcv2_jax.linear_eval --weights dcv2_rn50.pth --config configs/dcv2_2crops.py --out /runs/le

Train: RandomResizedCrop 224 (scale 0.08-1) + horizontal flip, the trunk in eval mode (BatchNorm running
statistics, no gradient), Linear(features, classes) initialised N(0, 0.01) / 0, cross-entropy, SGD momentum
0.9, weight decay 1e-6, batch 256, 100 epochs, LR 0.3 cosine-annealed per epoch to 0. Validation: Resize 256,
CentreCrop 224, top-1 / top-5. `python -m dcv2_jax.evaluate` is the quick alternative (a probe on
pre-extracted centre-crop features: minutes instead of hours, a little below the published numbers).

The data path is the training pipeline's (grain, crops cut on CPU, flip and normalisation on the device) with
one crop per image and the colour operations off. Runs resume by default: <out> (default
<workdir>/linear_eval) holds an orbax checkpoint of the Linear layer and its optimizer after every epoch,
and the same command continues from it. Metrics: <out>/metrics.jsonl, one line per epoch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from dcv2_jax import augment, checkpoint, data, evaluate
from dcv2_jax import sharding as shd
from dcv2_jax.config import base_config
from dcv2_jax.logging_utils import MetricWriter, format_eta


def default_config() -> ml_collections.ConfigDict:
  """The published protocol (spec: "Linear eval (SwAV repo)")."""
  c = ml_collections.ConfigDict()
  c.epochs = 100
  c.batch_size = 256             # global
  c.lr = 0.3
  c.final_lr = 0.0
  c.weight_decay = 1e-6
  c.momentum = 0.9
  c.nesterov = False
  c.crop_size = 224              # RandomResizedCrop size; validation: centre crop of the same size
  c.crop_scale = (0.08, 1.0)
  c.flip_p = 0.5
  c.eval_every_epochs = 1        # and after the last epoch (one matmul on pre-extracted val features)
  c.seed = 0
  return c


def lr_at_epoch(cfg, epoch):
  """Cosine annealing stepped per epoch, as torch's CosineAnnealingLR(epochs, eta_min=final_lr)."""
  return cfg.final_lr + (cfg.lr - cfg.final_lr) * 0.5 * (1 + jnp.cos(jnp.pi * epoch / cfg.epochs))


def _pipeline_config(data_cfg, cfg, mean, std) -> ml_collections.ConfigDict:
  """A training-pipeline config: one RandomResizedCrop per image; flip and normalisation only."""
  c = base_config()
  c.data = ml_collections.ConfigDict(data_cfg.to_dict())
  c.data.crops = ((int(cfg.crop_size), 1, float(cfg.crop_scale[0]), float(cfg.crop_scale[1])),)
  c.batch_size, c.num_epochs, c.seed = int(cfg.batch_size), int(cfg.epochs), int(cfg.seed)
  a = c.augment
  a.where, a.flip_p, a.jitter_p, a.grayscale_p, a.blur_p = "device", float(cfg.flip_p), 0.0, 0.0, 0.0
  a.mean, a.std = tuple(mean), tuple(std)
  return c


def make_optimizer(cfg) -> optax.GradientTransformation:
  """torch.optim.SGD's update without the LR: d = g + wd * p; buf = momentum * buf + d (nesterov: d +
  momentum * buf). The step multiplies by -lr_at_epoch(epoch) itself, so the LR follows the epoch being
  trained, not an optimizer step count that a resumed run with another batch size would misread."""
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                     optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov))


def masked_cross_entropy(logits, labels, ok):
  """Mean cross-entropy over the rows where ok (undecodable samples carry index -1: not ok); 0 if none."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(ok, labels, 0))
  return jnp.sum(jnp.where(ok, ce, 0.0)) / jnp.maximum(jnp.sum(ok), 1)


def _check(cfg, stop_after_epoch):
  problems = [f"{k}={cfg[k]} must be > 0" for k in ("epochs", "batch_size", "eval_every_epochs", "crop_size")
              if cfg[k] <= 0]
  if not 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1:
    problems.append(f"crop_scale={tuple(cfg.crop_scale)}: need 0 < min <= max <= 1")
  if stop_after_epoch is not None and stop_after_epoch <= 0:
    problems.append(f"stop_after_epoch={stop_after_epoch} must be > 0")
  if problems:
    raise ValueError("linear eval: " + "; ".join(problems))


def train_linear(apply_fn, variables, data_cfg, out_dir: str, cfg=None, *, mesh=None,
                 mean=evaluate.DEFAULT_MEAN, std=evaluate.DEFAULT_STD, stop_after_epoch: int | None = None) -> dict:
  """Trains (or resumes) the Linear layer in `out_dir`; returns the last epoch's record (val_top1 of the
  last evaluation and val_top1_best over all of them, as the SwAV repo reports).

  apply_fn(variables, float32 normalised NHWC images) -> pooled features (dcv2_jax.load_trunk gives both).
  stop_after_epoch: stop once that many epochs are done (a job with a time limit); the same call resumes.
  """
  cfg = default_config() if cfg is None else cfg
  _check(cfg, stop_after_epoch)
  last = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch)
  ckpts = checkpoint.Checkpoints(out_dir, keep=2)
  meta = ckpts.restore_meta()
  if meta is not None:
    saved = {k: meta["protocol"][k] for k in ("epochs", "batch_size", "lr", "seed")}
    if saved != {k: cfg[k] for k in saved}:
      ckpts.close()
      raise ValueError(f"{out_dir} holds a linear eval with {saved}; this one has "
                       f"{ {k: cfg[k] for k in saved} }. Use another --out (or the same settings).")
    if meta["epoch"] >= last:                     # nothing left to do: no data, no features
      ckpts.close()
      return meta["record"]

  mesh = shd.make_mesh() if mesh is None else mesh
  is_main = jax.process_index() == 0
  pcfg = _pipeline_config(data_cfg, cfg, mean, std)
  pipeline = data.Pipeline(pcfg)
  if pipeline.num_classes is None:
    ckpts.close()
    raise ValueError(f"linear evaluation needs labels: data source {data_cfg.source!r} has no classes")
  spe, num_classes = pipeline.steps_per_epoch, int(pipeline.num_classes)
  variables = jax.device_put(variables, shd.replicated(mesh))

  # ------------------------------------------------------------------------------ validation features
  # The trunk is frozen: validation features are extracted once, and every evaluation is one matmul.
  val_feats, val_labels, _ = evaluate.split_features(apply_fn, variables, data_cfg, data_cfg.eval_split,
                                                     image_size=int(cfg.crop_size), mesh=mesh, mean=mean, std=std)
  feature_dim = int(val_feats.shape[1])
  val_feats = jax.device_put(val_feats, shd.replicated(mesh))

  # ------------------------------------------------------------------------------ Linear layer, optimizer
  tx = make_optimizer(cfg)
  key = jax.random.key(cfg.seed)
  params = {"kernel": 0.01 * jax.random.normal(key, (feature_dim, num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32)}
  state = jax.device_put((params, tx.init(params)), shd.replicated(mesh))
  first_epoch, record = 0, {}
  if meta is not None:
    state, meta = ckpts.restore(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
    first_epoch, record = int(meta["epoch"]), meta["record"]
    logging.info("linear eval: resumed after epoch %d", first_epoch)

  def step(state, variables, batch, epoch):
    params, opt_state = state
    crops = batch["crops"][0][:, 0]                                            # [B, S, S, 3] uint8
    keys = augment.crop_keys(cfg.seed, epoch, batch["index"], 1)[:, 0]
    x = augment.device_augment(crops, keys, pcfg.augment, jnp.float32)
    feats = jax.lax.stop_gradient(apply_fn(variables, x))
    loss_fn = lambda p: masked_cross_entropy(feats @ p["kernel"] + p["bias"], batch["label"], batch["index"] >= 0)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    lr = lr_at_epoch(cfg, epoch)
    params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
    return (params, opt_state), loss

  step = jax.jit(step, donate_argnums=0, out_shardings=(shd.replicated(mesh), shd.replicated(mesh)))
  writer = MetricWriter(out_dir, enabled=is_main)
  zeros, ones = jnp.zeros((feature_dim,)), jnp.ones((feature_dim,))
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
        top1, top5 = evaluate._probe_accuracy(state[0], val_feats, val_labels, zeros, ones, min(5, num_classes))
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


def _parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m dcv2_jax.linear_eval", description=__doc__.split("\n")[0])
  p.add_argument("--workdir", help="training workdir: weights and config.json")
  p.add_argument("--weights", help="anything dcv2_jax.load_trunk accepts (default: --workdir)")
  p.add_argument("--config", help="config .py or .json for the data (default: <workdir>/config.json)")
  p.add_argument("--out", help="where checkpoints and metrics go (default: <workdir>/linear_eval)")
  evaluate.add_data_flags(p)
  for key, value in default_config().items():
    kind = {bool: lambda v: v.lower() in ("1", "true", "yes"), tuple: lambda v: tuple(float(x) for x in v.split(","))
            }.get(type(value), type(value))
    p.add_argument(f"--{key}", type=kind, default=None, help=f"default {value}")
  p.add_argument("--stop_after_epoch", type=int, help="stop after this epoch (the same command continues)")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = _parse_args(argv)
  from dcv2_jax import distributed, load_trunk
  distributed.initialize()
  logging.set_verbosity(logging.INFO)       # the per-epoch progress lines (hours on ImageNet)
  if not (args.workdir or args.weights):
    raise SystemExit("give --workdir or --weights")
  out = args.out or (os.path.join(args.workdir, "linear_eval") if args.workdir else None)
  if out is None:
    raise SystemExit("give --out (or --workdir)")
  run_cfg = evaluate.run_config(args)
  cfg = default_config()
  for key in cfg:
    if getattr(args, key, None) is not None:
      cfg[key] = getattr(args, key)
  if run_cfg.data.source == "digits" and args.crop_size is None:
    cfg.crop_size = int(run_cfg.data.image_size_digits)     # the demo's images are smaller than 224
  apply_fn, variables = load_trunk(args.weights or args.workdir)
  mean = tuple(run_cfg.get("augment", {}).get("mean", evaluate.DEFAULT_MEAN))
  std = tuple(run_cfg.get("augment", {}).get("std", evaluate.DEFAULT_STD))
  record = train_linear(apply_fn, variables, run_cfg.data, out, cfg, mean=mean, std=std,
                        stop_after_epoch=args.stop_after_epoch)
  if jax.process_index() == 0:
    print(json.dumps({"linear_eval": record}, default=float))
  return record


if __name__ == "__main__":
  main(sys.argv[1:])
