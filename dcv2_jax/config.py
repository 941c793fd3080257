"""Default configuration: every key the trainer reads, with the published DCv2 recipe as its values.

Recipes in configs/ start from `base_config()` and change what differs. Any key can be overridden on the
command line, e.g. `--config.loss.temperature=0.2`; `configs/` header comments give full commands.
"""
from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 4096            # global, over all devices of all hosts
  c.per_device_batch_size = 0    # >0: global batch = this x device count (VISSL's BATCHSIZE_PER_REPLICA)
  c.num_epochs = 400

  # --- data (dcv2_jax/data) ---
  c.data = d = ml_collections.ConfigDict()
  d.source = "tfds"              # tfds | image_folder | digits
  d.path = ""                    # image folder, or the tfds data_dir
  d.name = "imagenet2012"        # tfds dataset name
  d.split = "train"
  d.eval_split = "validation"    # labelled split for evaluation ('' = none)
  # Crop groups, large first: (size, count, min_scale, max_scale). 2x224 as published.
  d.crops = ((224, 2, 0.08, 1.0),)
  d.num_workers = 8              # grain worker processes per host (0 = in the main process)
  d.prefetch = 2                 # batches prepared ahead, per worker / on device
  d.image_size_digits = 32       # digits demo: 8x8 images are upscaled to this size first

  # --- augmentation (spec: applied independently per crop) ---
  c.augment = a = ml_collections.ConfigDict()
  a.where = "device"             # device: colour ops inside the jitted step; host: on CPU in the pipeline
  a.flip_p = 0.5
  a.jitter_p = 0.8
  a.jitter = (0.8, 0.8, 0.8, 0.2)  # brightness, contrast, saturation, hue
  a.grayscale_p = 0.2
  a.blur_p = 0.5
  a.blur_sigma = (0.1, 2.0)
  a.mean = (0.485, 0.456, 0.406)
  a.std = (0.228, 0.224, 0.225)  # SwAV repo; VISSL uses 0.229 for red

  # --- model (dcv2_jax/models.py) ---
  c.model = m = ml_collections.ConfigDict()
  m.depth = 50                   # 18 | 34 | 50 | 101 | 152
  m.width = 1                    # width multiplier: 2 = ResNet-50-w2
  m.base_width = 64              # channels of the stem; < 64 only for small tests and the demo
  m.head_dims = (2048, 128)      # projection head output dims; the last is the embedding dim
  m.head_bn = True               # BatchNorm after every hidden Linear (SwAV repo); False = VISSL yaml
  m.head_relu = True             # ReLU after every hidden Linear
  m.head_input_dim = -1          # -1: the trunk's feature dim; else checked against it
  m.dtype = "bfloat16"           # compute dtype: float32 | bfloat16 | float16 (params stay float32)
  m.bn_momentum = 0.9            # Flax convention (PyTorch momentum 0.1)
  m.bn_eps = 1e-5
  m.sync_bn = ml_collections.ConfigDict()
  m.sync_bn.group_size = 0       # 0: global; -1: devices of one host; k: groups of k devices

  # --- DCv2 loss, memory bank and k-means ---
  c.loss = l = ml_collections.ConfigDict()
  l.temperature = 0.1
  l.num_clusters = (3000, 3000, 3000)
  l.kmeans_iters = 10
  l.crops_for_mb = (0, 1)
  l.kmeans_chunk = 65536         # bank rows per assignment chunk (memory: chunk x K floats)
  l.empty_clusters = "keep"      # keep (reference) | reseed (from the rows farthest from their centroid)

  # --- optimizer (dcv2_jax/optim.py) ---
  c.optim = o = ml_collections.ConfigDict()
  o.name = "larc"                # larc (apex semantics, as published) | lars (optax.lars) | sgd
  o.lr = 4.8                     # peak LR at lr_reference_batch
  o.warmup_start_lr = 0.3
  o.final_lr = 0.0048
  o.lr_reference_batch = 4096
  o.scale_lr_with_batch = True   # linear rule: every LR above x batch_size / lr_reference_batch
  o.warmup_epochs = 10
  o.momentum = 0.9
  o.weight_decay = 1e-6
  o.trust_coefficient = 0.001
  o.clip = False
  o.eps = 1e-8
  o.loss_scale = 2.0 ** 15       # fp16 only: initial dynamic loss scale
  o.loss_scale_period = 2000     # fp16 only: finite steps before the scale doubles

  # --- trainer ---
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_every_epochs = 0        # 0 = only at the end
  return c
