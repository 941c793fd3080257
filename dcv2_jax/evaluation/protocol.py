"""The evaluation protocols, defined once: the published linear evaluation and the quick probe derived from it.

`linear_protocol()` is the SwAV repo's eval_linear (spec: "Linear eval"): a Linear layer on frozen trunk
features, SGD momentum 0.9, coupled weight decay 1e-6, batch 256, 100 epochs, LR 0.3 cosine-annealed per
epoch to 0; RandomResizedCrop 224 + flip for training (linear_on_crops.py), Resize 256 / CentreCrop 224 for
validation; and the weighted kNN (k=20, T=0.07) of InstDisc / DINO. The quick probe (quick.py) trains the
same Linear layer with the same optimizer and schedule on pre-extracted centre-crop features:
  * "imagenet": the published hyperparameters on raw pooled features;
  * "fast": for small data (digits, tests), standardized features so one LR suits any trunk and width.
`protocol_for` picks one from the data, for the trainer's end-of-run evaluation and the evaluate command
alike ("auto").
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax

PROTOCOLS = ("auto", "imagenet", "fast")


def linear_protocol() -> ml_collections.ConfigDict:
  p = ml_collections.ConfigDict()
  p.name = "imagenet"
  p.epochs = 100
  p.batch_size = 256             # global
  p.lr = 0.3
  p.final_lr = 0.0
  p.weight_decay = 1e-6
  p.momentum = 0.9
  p.nesterov = False
  p.crop_size = 224              # RandomResizedCrop size; validation: centre crop of the same size
  p.crop_scale = (0.08, 1.0)
  p.flip_p = 0.5
  p.eval_every_epochs = 1        # and after the last epoch (one matmul on pre-extracted val features)
  p.seed = 0
  p.standardize = False          # the published protocol feeds raw pooled features to the Linear layer
  p.knn_k = 20
  p.knn_temperature = 0.07
  p.extract_batch_size = 256     # feature-extraction batch per process
  return p


def fast_protocol() -> ml_collections.ConfigDict:
  """The quick probe for small data: standardized features, a shorter schedule."""
  p = linear_protocol()
  p.name = "fast"
  p.epochs = 30
  p.batch_size = 128
  p.lr = 0.1
  p.weight_decay = 1e-4
  p.standardize = True
  return p


def get_protocol(name: str) -> ml_collections.ConfigDict:
  return {"imagenet": linear_protocol, "fast": fast_protocol}[name]()


def protocol_for(data_cfg, name: str = "auto") -> ml_collections.ConfigDict:
  """`name`, or for "auto": fast for the digits demo's data, the published protocol otherwise."""
  if name == "auto":
    name = "fast" if data_cfg.source == "digits" else "imagenet"
  return get_protocol(name)


def lr_at_epoch(protocol, epoch):
  """Cosine annealing stepped per epoch, as torch's CosineAnnealingLR(epochs, eta_min=final_lr)."""
  return protocol.final_lr + (protocol.lr - protocol.final_lr) * 0.5 * (1 + jnp.cos(jnp.pi * epoch / protocol.epochs))


def sgd_without_lr(protocol) -> optax.GradientTransformation:
  """torch.optim.SGD's update without the LR: d = g + wd * p; buf = momentum * buf + d (nesterov: d +
  momentum * buf). The caller multiplies by -lr_at_epoch(epoch) itself, so the LR follows the epoch being
  trained, not an optimizer step count that a resumed run with another batch size would misread."""
  return optax.chain(optax.add_decayed_weights(protocol.weight_decay),
                     optax.trace(decay=protocol.momentum, nesterov=protocol.nesterov))

