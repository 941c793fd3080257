"""Every setting of a run: the defaults (the published DCv2 recipe), the allowed choices, and the one check.

Recipes in configs/ start from `base_config()` and change what differs. Any key can be overridden on the
command line, e.g. `--config.loss.temperature=0.2`. Before anything is built the trainer calls
`resolve` (derived values: the global batch, the LR note) and `validate` (every impossible setting, all in
one message). Nothing downstream checks a setting again: each set of choices is defined once, by the
module that implements it (CHOICES below points there), and checked here.
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import os
import sys

import ml_collections

from dcv2_jax import augment, kmeans, optim
from dcv2_jax.conventions import DTYPES, PRECISIONS
from dcv2_jax.data import pipeline, sources, transforms
from dcv2_jax.model import trunk, weight_grads


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
  d.crops_on = "auto"            # where the crops are cut: host (CPU, PIL) | device (in the jitted step; the CPU only
                                 # decodes) | auto (device on GPUs unless augment.where=host, host elsewhere).
                                 # data/pipeline.py, device_crops.py
  d.canvas_size = 0              # device crops: images travel on a canvas x canvas canvas, larger ones downscaled to
                                 # fit first; 0 = auto: 512 for crops >= 160 px (ImageNet photos), else the largest crop
  d.num_workers = 8              # grain worker processes per host (0 = in the main process)
  d.prefetch = 2                 # batches prepared ahead, per worker / on device
  d.image_size_digits = 32       # digits demo: 8x8 images are upscaled to this size first
  d.threads_per_worker = 1       # threads building batches in each worker (or in-process if num_workers=0)
  d.max_bad_fraction = 0.01      # undecodable files are skipped; a run with a larger share of them stops
  d.eval_image_size = 0          # evaluation resolution; 0 = auto: 224 (Resize 256 + centre crop) when the
                                 # largest training crop is >= 160 px, else that crop's size (whole image)
  d.eval_resize = "auto"         # center_crop (Resize S*256/224, CentreCrop S) | whole (the image resized to
                                 # S x S, as CIFAR evaluations do) | auto (center_crop at 224, else whole)

  # --- augmentation (spec: applied independently per crop) ---
  c.augment = a = ml_collections.ConfigDict()
  a.where = "device"             # device: colour ops inside the jitted step; host: on CPU in the pipeline
  a.flip_p = 0.5
  a.jitter_p = 0.8
  a.jitter = (0.8, 0.8, 0.8, 0.2)  # brightness, contrast, saturation, hue
  a.jitter_order = "random"      # random per image (torchvision ColorJitter) | fixed (b, c, s, h; cheaper)
  a.grayscale_p = 0.2
  a.blur_p = 0.5
  a.blur_sigma = (0.1, 2.0)
  a.blur_kernel_size = 23        # taps at every crop size (the released models' OpenCV 23x23); 0 = use frac
  a.blur_kernel_frac = 0.1       # blur taps 2*floor(frac*S/2)+1: 23 at S=224, 17 at 160, 9 at 96
  a.mean = (0.485, 0.456, 0.406)
  a.std = (0.228, 0.224, 0.225)  # SwAV repo; VISSL uses 0.229 for red

  # --- model (dcv2_jax/model/) ---
  c.model = m = ml_collections.ConfigDict()
  m.depth = 50                   # 18 | 34 | 50 | 101 | 152
  m.width = 1                    # width multiplier: 2 = ResNet-50-w2
  m.base_width = 64              # channels of the stem; < 64 only for small tests and the demo
  m.head_dims = (2048, 128)      # projection head output dims; the last is the embedding dim
  m.head_bn = True               # BatchNorm after every hidden Linear (SwAV repo); False = VISSL yaml
  m.head_relu = True             # ReLU after every hidden Linear
  m.groups = 1                   # ResNeXt: groups of the 3x3 convs (32 for ResNeXt-50 32x4d / 101 32x8d)
  m.width_per_group = 64         # ResNeXt: channels per group at width 64 (4 for 32x4d, 8 for 32x8d)
  m.stem = "imagenet"            # imagenet: 7x7/2 conv + max-pool | cifar: 3x3/1 conv, no max-pool (small images)
  m.head_input_dim = -1          # -1: the trunk's feature dim; else checked against it
  m.dtype = "bfloat16"           # compute dtype: float32 | bfloat16 | float16 (params stay float32)
  m.grad_reduce_dtype = "float32"  # the dtype weight gradients are summed over the devices in: float32 (as
                                 # PyTorch DDP under AMP) | compute (model.dtype; half the bytes; weight_grads.py)
  m.matmul_precision = "default"  # float32 convs/matmuls: default (TF32 on GPU) | highest (true fp32, as V100s)
  m.bn_momentum = 0.9            # Flax convention (PyTorch momentum 0.1)
  m.bn_eps = 1e-5
  m.sync_bn = ml_collections.ConfigDict()
  m.sync_bn.samples = 0          # >0: BatchNorm statistics over groups of this many samples, on any device count
                                 # (the recipes: 512 = 8 GPUs x 64, as published); 0: group_size decides
  m.sync_bn.group_size = 0       # VISSL's GROUP_SIZE, in devices: 0 global; -1 devices of one host; k devices

  # --- DCv2 loss, memory bank and k-means ---
  c.loss = l = ml_collections.ConfigDict()
  l.temperature = 0.1
  l.num_clusters = (3000, 3000, 3000)
  l.kmeans_iters = 10
  l.crops_for_mb = (0, 1)
  l.kmeans_chunk = 65536         # bank rows per assignment chunk (memory: chunk x K floats)
  l.kmeans_dtype = "float32"     # matmul inputs of k-means: float32 (TF32 on GPU) | bfloat16 (faster)
  l.kmeans_precision = "default"  # k-means scores in float32: default (TF32 on GPU) | highest (true fp32)
  l.kmeans_sums = "scatter"      # cluster sums: scatter (add rows) | onehot (one-hot matmul)
  l.kmeans_assign = "xla"        # nearest centroid: xla (matmul + argmax) | pallas (fused GPU kernel, no scores
                                 # in memory; interpreted, slowly, on CPU; falls back to xla without Triton)
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
  o.exclude_bias_and_norm = False  # larc: leave 1-d tensors (biases, BN) out of trust ratio and decay (solo-learn)
  o.loss_scale = 2.0 ** 15       # fp16 only: initial dynamic loss scale
  o.loss_scale_period = 2000     # fp16 only: finite steps before the scale doubles

  # --- trainer ---
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.keep_assignments = 10        # per-epoch assignment tables kept in <workdir>/assignments (0 = all)
  c.eval_at_end = False          # kNN + linear probe on data.eval_split after training
  c.eval_random_init = False     # also evaluate the network at initialisation, for comparison
  c.eval_every_epochs = 0        # >0: a weighted kNN on the eval split every N epochs (knn_top1 in the metrics)
  c.eval_max_samples = 10000     # the live kNN's fixed subsets of the train and eval splits (0 = all)
  c.log_cluster_images = 0       # >0: per epoch, this many clusters x their images nearest the centroid
  return c


# Each set of choices, defined by the module that implements it.
CHOICES = {
    "data.source": sources.SOURCES,
    "data.crops_on": pipeline.CROPS_ON,
    "augment.where": augment.WHERE,
    "augment.jitter_order": augment.JITTER_ORDERS,
    "model.depth": tuple(sorted(trunk.STAGES)),
    "model.dtype": tuple(DTYPES),
    "model.grad_reduce_dtype": weight_grads.REDUCE_DTYPES,
    "model.matmul_precision": tuple(PRECISIONS),
    "model.stem": trunk.STEMS,
    "loss.kmeans_precision": tuple(PRECISIONS),
    "data.eval_resize": ("auto",) + transforms.EVAL_VIEWS,
    "loss.kmeans_dtype": kmeans.DTYPES,
    "loss.kmeans_sums": kmeans.SUMS,
    "loss.kmeans_assign": kmeans.ASSIGN,
    "loss.empty_clusters": kmeans.EMPTY_CLUSTERS,
    "optim.name": optim.OPTIMIZERS,
}


class ConfigError(ValueError):
  """A setting that cannot work, found before anything is compiled."""


def resolve(config, num_devices: int, platform: str = "cpu") -> tuple[ml_collections.ConfigDict, list[str]]:
  """Derived settings for a run on num_devices of `platform` (jax's backend name): the global batch from
  per_device_batch_size, SyncBN groups, the evaluation view, where the crops are cut and their canvas. Returns
  (config, notes to log)."""
  config = ml_collections.ConfigDict(config.to_dict())   # unlocked copy; the caller's stays as given
  notes = []
  if config.per_device_batch_size > 0:
    config.batch_size = config.per_device_batch_size * num_devices
    notes.append(f"batch_size = per_device_batch_size {config.per_device_batch_size} x {num_devices} devices "
                 f"= {config.batch_size}")
    config.per_device_batch_size = 0     # resolved: everything downstream reads batch_size
  gs = config.model.sync_bn.group_size
  if gs > num_devices:
    # The recipes' SyncBN groups of 8 on fewer devices: one group of all of them is what a group of 8
    # would hold, so the same command runs on 1, 2 or 4 GPUs (apex would refuse to build the group).
    config.model.sync_bn.group_size = 0
    notes.append(f"model.sync_bn.group_size={gs} > {num_devices} device(s): BatchNorm statistics over all "
                 f"{num_devices} (one group)")
  d = config.data
  if d.crops_on == "auto":
    d.crops_on = pipeline.crops_on(config, platform)
    notes.append(f"data.crops_on=auto on {platform}: {d.crops_on} (" + (
        "the crops are cut in the step, the CPU only decodes)" if d.crops_on == "device"
        else "the CPU cuts the crops)"))
  if d.crops_on == "device" and not d.canvas_size and d.crops and not crop_problems(d.crops):
    d.canvas_size = pipeline.canvas_size(d)
    notes.append(f"device crops: images travel on a {d.canvas_size} x {d.canvas_size} canvas, larger ones downscaled "
                 "to fit (data.canvas_size)")
  size, view = eval_view(config.data)
  if (config.data.eval_image_size, config.data.eval_resize) != (size, view):
    notes.append(f"evaluation at {size} px ({view}): data.eval_image_size={size}, data.eval_resize={view}")
    config.data.eval_image_size, config.data.eval_resize = size, view
  o = config.optim
  if o.scale_lr_with_batch and config.batch_size != o.lr_reference_batch:
    f = config.batch_size / o.lr_reference_batch
    notes.append(f"linear LR scaling: global batch {config.batch_size} / reference {o.lr_reference_batch} -> "
                 f"peak LR {o.lr * f:.4g}, warm-up start {o.warmup_start_lr * f:.4g}, final {o.final_lr * f:.4g} "
                 "(set optim.scale_lr_with_batch=False to use the values as given)")
  return config, notes


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def crop_problems(crops) -> list[str]:
  """What is wrong with `data.crops` (groups (size, count, min_scale, max_scale), large first), if anything."""
  crops = tuple(tuple(c) for c in crops)
  if not crops or any(len(c) != 4 or c[0] < 1 or c[1] < 1 or not 0 < c[2] <= c[3] <= 1 for c in crops):
    return [f"data.crops={crops}: give groups (size, count, min_scale, max_scale) with size >= 1, count >= 1 and "
            "0 < min_scale <= max_scale <= 1"]
  if any(a[0] < b[0] for a, b in zip(crops, crops[1:])):
    return [f"data.crops={crops}: list large crops first (sizes {[c[0] for c in crops]})"]
  return []


def validate(config, num_examples: int, steps_per_epoch: int, num_devices: int, num_processes: int) -> None:
  """All impossible settings at once, in one message, before anything is built or compiled."""
  problems = [f"{key}={_get(config, key)!r}: choose one of {', '.join(map(str, allowed))}"
              for key, allowed in CHOICES.items() if _get(config, key) not in allowed]
  b, loss_cfg, m = config.batch_size, config.loss, config.model
  if b <= 0:
    problems.append(f"batch_size={b} must be > 0 (or set per_device_batch_size)")
  elif b % num_devices:
    problems.append(f"batch_size {b} is not divisible by the {num_devices} devices")
  elif b % num_processes:
    problems.append(f"batch_size {b} is not divisible by the {num_processes} processes")
  if 0 < num_examples < b:
    problems.append(f"the dataset has {num_examples} samples, fewer than one global batch of {b}: lower "
                    "batch_size (or per_device_batch_size)")
  problems += crop_problems(config.data.crops)
  num_crops = sum(int(c[1]) for c in config.data.crops if len(c) == 4)
  if not loss_cfg.crops_for_mb or any(not 0 <= c < num_crops for c in loss_cfg.crops_for_mb):
    problems.append(f"loss.crops_for_mb={tuple(loss_cfg.crops_for_mb)}: crop numbers must lie in [0, {num_crops}) "
                    f"for data.crops={tuple(map(tuple, config.data.crops))}")
  ks = tuple(loss_cfg.num_clusters)
  if not ks or any(int(k) < 1 for k in ks):
    problems.append(f"loss.num_clusters={ks}: give one or more heads, each with one or more clusters")
  rows = steps_per_epoch * b
  if ks and max(ks) > rows:
    problems.append(f"loss.num_clusters={ks}: more clusters than memory-bank rows ({rows} = {steps_per_epoch} "
                    f"steps x batch {b} of the {num_examples} samples); lower num_clusters")
  if m.depth in trunk.STAGES:
    trunk_dim = trunk.TrunkArch.from_config(m).feature_dim
    if m.head_input_dim not in (-1, trunk_dim):
      problems.append(f"model.head_input_dim={m.head_input_dim} does not match the trunk's feature dim {trunk_dim} "
                      f"(depth {m.depth}, width {m.width}); set it to -1 or {trunk_dim}")
  if m.groups < 1 or m.width_per_group < 1:
    problems.append(f"model.groups={m.groups}, model.width_per_group={m.width_per_group} must be >= 1")
  elif (m.groups, m.width_per_group) != (1, 64) and trunk.STAGES.get(m.depth, ("basic",))[0] != "bottleneck":
    problems.append(f"model.groups={m.groups} / width_per_group={m.width_per_group}: ResNeXt needs bottleneck blocks "
                    "(model.depth 50, 101 or 152), as torchvision's")
  if not m.head_dims or any(d <= 0 for d in m.head_dims):
    problems.append(f"model.head_dims={tuple(m.head_dims)}: give positive layer widths, the last = embedding dim")
  gs, samples = m.sync_bn.group_size, m.sync_bn.samples
  if samples and gs:
    problems.append(f"model.sync_bn.samples={samples} and group_size={gs}: set one (samples fixes the statistics "
                    "batch on any device count; group_size counts devices, as VISSL)")
  elif samples:
    problems += sample_group_problems(samples, b, num_devices)
  elif gs not in (0, -1) and (gs < 0 or num_devices % gs):
    problems.append(f"model.sync_bn.group_size={gs}: use 0 (global), -1 (per host) or a divisor of the "
                    f"{num_devices} devices")
  if loss_cfg.temperature <= 0:
    problems.append(f"loss.temperature={loss_cfg.temperature} must be > 0")
  if loss_cfg.kmeans_iters < 0 or loss_cfg.kmeans_chunk <= 0:
    problems.append(f"loss.kmeans_iters={loss_cfg.kmeans_iters} must be >= 0 and loss.kmeans_chunk="
                    f"{loss_cfg.kmeans_chunk} > 0")
  if config.data.crops_on == "device" and config.augment.where == "host":
    problems.append("data.crops_on=device with augment.where=host: the colour ops run after the crops, on the host "
                    "only if the crops are cut there; set one of them")
  largest = max((int(c[0]) for c in config.data.crops if len(c) == 4), default=0)
  if config.data.canvas_size and config.data.canvas_size < largest:
    problems.append(f"data.canvas_size={config.data.canvas_size} is smaller than the largest crop ({largest} px): every "
                    "crop would be upsampled from it; use 0 (auto) or at least the largest crop's size")
  if not 0 <= config.data.max_bad_fraction <= 1:
    problems.append(f"data.max_bad_fraction={config.data.max_bad_fraction} must lie in [0, 1]")
  for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "num_epochs"):
    if config[key] <= 0:
      problems.append(f"{key}={config[key]} must be > 0")
  if problems:
    raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def sample_group_problems(samples: int, batch: int, num_devices: int) -> list[str]:
  """BatchNorm groups of `samples` must tile the global batch and line up with the devices (a group spans
  whole devices, or a device holds whole groups); else the nearest settings that do."""
  if samples < 0 or batch <= 0 or batch % num_devices:
    return [] if samples > 0 else [f"model.sync_bn.samples={samples} must be >= 0"]
  per_device = batch // num_devices
  fits = lambda s, p: (p * num_devices) % s == 0 and (s % p == 0 or p % s == 0)
  if fits(samples, per_device):
    return []
  near_samples = sorted((s for s in range(1, batch + 1) if fits(s, per_device)), key=lambda s: abs(s - samples))[:2]
  near_batch = sorted((p for p in range(1, 4 * max(samples, per_device) + 1) if fits(samples, p)),
                      key=lambda p: abs(p - per_device))[:2]
  return [f"model.sync_bn.samples={samples} cannot be met exactly with {per_device} samples on each of "
          f"{num_devices} devices (global batch {batch}): groups must tile the batch and line up with the devices. "
          f"Nearest: --config.model.sync_bn.samples={' or '.join(map(str, sorted(near_samples)))}, or "
          f"--config.per_device_batch_size={' or '.join(map(str, sorted(near_batch)))}"]


def eval_view(data_cfg) -> tuple[int, str]:
  """(size, view) evaluation sees images at: data.eval_image_size and data.eval_resize, each "auto" (0) resolved
  from the training crops. Training crops of ImageNet size (the largest >= 160 px): the published protocol,
  Resize 256 + CentreCrop 224. Smaller (CIFAR, STL-10, the digits): the largest crop's size, the whole image
  resized to it (a 224/256 centre crop keeps only 87.5% of a small image's side)."""
  largest = max((int(c[0]) for c in data_cfg.crops), default=224)
  imagenet_sized = largest >= 160
  size = int(data_cfg.eval_image_size) or (224 if imagenet_sized else largest)
  view = data_cfg.eval_resize if data_cfg.eval_resize != "auto" else ("center_crop" if imagenet_sized else "whole")
  return size, view


def normalization(config) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) the network was trained with: evaluation normalises with the same."""
  return tuple(config.augment.mean), tuple(config.augment.std)


# ---------------------------------------------------------------------------------------- config files

def load_file(path: str) -> ml_collections.ConfigDict:
  """A config file: configs/*.py with get_config() (optionally 'file.py:arg'), or a run's config.json.

  A config.json is laid over base_config(), so a run written before a key existed reads with its default.
  """
  if path.endswith(".json"):
    with open(path) as f:
      return from_saved(json.load(f))
  file, _, arg = path.partition(":")
  folder = os.path.dirname(os.path.abspath(file))
  if os.path.exists(os.path.join(folder, "__init__.py")) and os.path.dirname(folder) not in sys.path:
    # A package of recipes that import each other (configs/dcv2_2x160_4x96.py: `from configs import ...`), read
    # from any working directory.
    sys.path.insert(0, os.path.dirname(folder))
  spec = importlib.util.spec_from_file_location("_dcv2_config", file)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"{file}: not a config file (configs/*.py or a run's config.json)")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A config saved as JSON (config.json, a checkpoint's meta) laid over base_config(): keys the saving
  version did not have take their defaults, keys this version does not know are dropped."""
  def flat(tree, prefix=""):
    for k, v in tree.items():
      if isinstance(v, dict):
        yield from flat(v, f"{prefix}{k}.")
      else:   # JSON turned tuples into lists; the ConfigDict fields are tuples
        yield prefix + k, tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v

  config = base_config()
  known = set(all_keys(config))
  config.update_from_flattened_dict({k: v for k, v in flat(saved) if k in known})
  return config


def all_keys(config, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      keys += all_keys(v, f"{prefix}{k}.")
    else:
      keys.append(prefix + k)
  return keys


def unknown_keys_message(config, overrides) -> str | None:
  """None if every dotted key in `overrides` exists in `config`, else a message listing the valid keys."""
  valid = all_keys(config)
  bad = [k for k in overrides if k not in valid]
  if not bad:
    return None
  lines = [f"unknown config key --config.{k}" + (f" (did you mean {', '.join(m)}?)" if (
      m := difflib.get_close_matches(k, valid, n=2)) else "") for k in bad]
  return "\n".join(lines) + "\nvalid keys:\n  " + "\n  ".join(valid)
