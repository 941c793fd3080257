"""The training input pipeline (multi-crop batches) and the evaluation batches, on grain.

Determinism is the design: an epoch's order is a permutation drawn from (seed, epoch); global batch s is
rows [s*G, (s+1)*G) of it (the last partial batch is dropped); process p of P reads rows
[p*G/P, (p+1)*G/P) of every global batch; a sample's crops (and host-side colour ops) draw from
(seed, epoch, dataset index) only. So the batches do not depend on worker count or process count, and
the iterator's whole state is {epoch, step}: a restart rebuilds the stream from there, no grain state
needed.

grain does the parallel work: a `MapDataset` over global batch numbers (epoch * steps_per_epoch + step),
mapped to this process's decoded and cropped batch, prefetched by `data.num_workers` worker processes
(grain_iterators.py; 0 = in the main process). The worker processes are kept from one epoch to the next: an
epoch iterator that runs to its end hands the grain iterator, already busy with the next epoch's first
batches, to the next `iterate(epoch + 1)`.
"""
from __future__ import annotations

import copy
import logging
import math
import threading
from typing import Iterator

import numpy as np

from dcv2_jax.conventions import BANK_PASS_EPOCH, steps_per_epoch
from dcv2_jax.data import grain_iterators, sources, transforms

log = logging.getLogger(__name__)
_REASON_CHARS = 200      # of an undecodable file's error message, carried from the worker to the main process


def crop_groups(crops) -> tuple[tuple[int, int, float, float], ...]:
  """`data.crops` (checked by config.validate) as plain Python tuples (size, count, min_scale, max_scale)."""
  return tuple((int(c[0]), int(c[1]), float(c[2]), float(c[3])) for c in crops)


# data.crops_on: where the random resized crops are cut. host: here, on the CPU (PIL); device: inside the jitted
# step (device_crops.py), the CPU only decodes. auto: device on GPUs, host elsewhere (a CPU computes the crops
# faster than its own resampling matmuls) and wherever the colour ops run on the host (augment.where=host: they
# follow the crops, so the crops must be cut there too).
CROPS_ON = ("auto", "host", "device")
# The canvas (data.canvas_size = 0, auto) of ImageNet-sized crops (the largest >= 160 px): 512 x 512 holds a
# typical photo of ImageNet (500 x 375) whole; a larger image is downscaled to fit. Smaller crops (CIFAR, STL-10,
# the digits) come from images of about the crop's size: the canvas is the largest crop's.
IMAGENET_CANVAS = 512


def crops_on(config, platform: str) -> str:
  """config.data.crops_on with auto resolved for a run on `platform` (jax's backend name)."""
  if config.data.crops_on != "auto":
    return config.data.crops_on
  return "device" if platform == "gpu" and config.augment.where != "host" else "host"


def canvas_size(data_cfg) -> int:
  """data.canvas_size with 0 (auto) resolved (see IMAGENET_CANVAS)."""
  largest = max(int(c[0]) for c in data_cfg.crops)
  return int(data_cfg.canvas_size) or (IMAGENET_CANVAS if largest >= 160 else largest)


def train_batch_shapes(crops, batch: int, where: str = "host", canvas: int = 0) -> dict:
  """What a training batch of `batch` samples holds for the train step: {name: (shape, numpy dtype)}. Crops cut
  on the host: 'crops', a list with one entry per crop group (`crop_groups`). Cut on the device: the decoded
  'image' on a canvas x canvas canvas (top-left), its 'image_size' (height, width) and the 'boxes' (top, left,
  height, width) of every crop, in the order of the groups."""
  common = dict(index=((batch,), np.int32), label=((batch,), np.int32))
  if where == "device":
    num_crops = sum(int(c[1]) for c in crops)
    return dict(image=((batch, canvas, canvas, 3), np.uint8), image_size=((batch, 2), np.int32),
                boxes=((batch, num_crops, 4), np.float32), **common)
  return dict(crops=[((batch, int(count), int(size), int(size), 3), np.uint8) for size, count, *_ in crops], **common)


def _plain_augment_cfg(cfg) -> dict:
  # A plain dict pickles cheaply into the workers and does not need ml_collections there.
  keys = ("flip_p", "jitter_p", "jitter", "jitter_order", "grayscale_p", "blur_p", "blur_sigma", "blur_kernel_size",
          "blur_kernel_frac")
  return {k: cfg[k] for k in keys if k in cfg}


class TrainBatchLoader:
  """Global batch number -> this process's batch. Picklable; runs inside the grain workers."""

  def __init__(self, source, *, seed: int, crops, host_augment_cfg: dict | None, num_examples: int,
               global_batch: int, local_batch: int, process_index: int, steps_per_epoch: int, where: str = "host",
               canvas: int = 0):
    self.source = source
    self.seed = int(seed)
    self.crops = crops
    self.where, self.canvas = where, canvas     # where the crops are cut (CROPS_ON), the device's canvas
    self.host_augment_cfg = host_augment_cfg
    self.num_examples = num_examples
    self.global_batch = global_batch
    self.local_batch = local_batch
    self.process_index = process_index
    self.steps_per_epoch = steps_per_epoch
    self.crop_epoch: int | None = None     # None: each epoch's own crops
    self._cache: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"], state["_lock"] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The epoch's global order: a permutation of the dataset from (seed, epoch) alone."""
    # spawn_key keeps this stream apart from the per-sample SeedSequence([seed, epoch, index]).
    seq = np.random.SeedSequence([self.seed, epoch], spawn_key=(1,))
    return np.random.Generator(np.random.PCG64(seq)).permutation(self.num_examples)

  def local_indices(self, epoch: int) -> np.ndarray:
    """[steps_per_epoch, local_batch] dataset indices this process reads in `epoch`."""
    with self._lock:
      if epoch not in self._cache:
        g, l, p = self.global_batch, self.local_batch, self.process_index
        order = self.epoch_order(epoch)[: self.steps_per_epoch * g].reshape(self.steps_per_epoch, g)
        if len(self._cache) >= 2:  # prefetch spans at most two epochs
          self._cache.pop(min(self._cache))
        self._cache[epoch] = np.ascontiguousarray(order[:, p * l:(p + 1) * l])
      return self._cache[epoch]

  def with_crop_epoch(self, crop_epoch: int) -> "TrainBatchLoader":
    """The same batches (sample order), with the crops drawn as in epoch `crop_epoch`."""
    other = copy.copy(self)
    other.crop_epoch = crop_epoch
    return other

  def __call__(self, batch_number: int) -> dict:
    epoch, step = divmod(int(batch_number), self.steps_per_epoch)
    indices = self.local_indices(epoch)[step]
    crop_epoch = epoch if self.crop_epoch is None else self.crop_epoch
    n = self.local_batch
    out = {name: [np.zeros(*sd) for sd in shape] if name == "crops" else np.zeros(*shape)
           for name, shape in train_batch_shapes(self.crops, n, self.where, self.canvas).items()}
    index, label = out["index"], out["label"]
    index[:], label[:] = -1, -1
    out["downscaled"] = np.zeros((n,), bool)
    bad_index = np.full((n,), -1, np.int32)
    bad_reason = np.full((n,), "", dtype=f"<U{_REASON_CHARS}")
    for row, i in enumerate(indices):
      i = int(i)
      try:
        example = self.source[i]
      except Exception as e:  # pylint: disable=broad-except  (PIL, I/O, tfds record errors alike)
        # A bad file must never stop training: skip it and mark it (index -1, zero crops); the main process
        # reports it once (Pipeline.bad_samples), not every epoch.
        bad_index[row], bad_reason[row] = i, f"{type(e).__name__}: {e}"[:_REASON_CHARS]
        continue
      # Outside the try: a bug in cropping or augmentation must fail loudly, not pass as a bad file.
      if self.where == "device":
        self._place_on_canvas(out, row, example["image"], crop_epoch, i)
      else:
        for dst, src in zip(out["crops"], self._sample_crops(example["image"], crop_epoch, i)):
          dst[row] = src
      index[row] = i
      label[row] = example["label"]
    return dict(out, bad_index=bad_index, bad_reason=bad_reason)

  def _place_on_canvas(self, out: dict, row: int, image: np.ndarray, epoch: int, index: int) -> None:
    """Device crops: the boxes drawn as the host path draws them (crop_boxes, from the sample's own random
    stream), the image on the canvas (downscaled first if larger: the boxes scale with it)."""
    boxes = transforms.crop_boxes(transforms.sample_rng(self.seed, epoch, index), image.shape[0], image.shape[1],
                                  self.crops)
    image, fy, fx = transforms.fit_canvas(image, self.canvas)
    out["image"][row, :image.shape[0], :image.shape[1]] = image
    out["image_size"][row] = image.shape[:2]
    out["boxes"][row] = boxes * np.asarray([fy, fx, fy, fx], np.float32)
    out["downscaled"][row] = (fy, fx) != (1.0, 1.0)

  def _sample_crops(self, image: np.ndarray, epoch: int, index: int) -> list:
    rng = transforms.sample_rng(self.seed, epoch, index)
    groups = transforms.multi_crop(image, rng, self.crops)
    if self.host_augment_cfg is not None:
      # Late: this runs in the grain workers, which import jax (through augment) in host mode only.
      from dcv2_jax import augment  # pylint: disable=g-import-not-at-top

      u = rng.random((sum(g[1] for g in self.crops), augment.NUM_UNIFORMS))
      groups = [augment.host_augment(x, u[sl], self.host_augment_cfg)
                for x, sl in zip(groups, augment.group_slices(self.crops))]
    return groups


class EpochIterator:
  """Batches of one epoch from a step on."""

  def __init__(self, pipeline: "Pipeline", epoch: int, start_step: int, grain_it, stop: int):
    self._pipeline = pipeline
    self.epoch = epoch
    self._step = start_step
    self._it = grain_it
    self._stop = stop            # the global batch number where grain_it ends
    self._closed = False

  def __iter__(self):
    return self

  def __len__(self) -> int:
    return self._pipeline.steps_per_epoch - self._step

  def __next__(self) -> dict:
    steps = self._pipeline.steps_per_epoch
    if self._closed:
      raise RuntimeError(f"the iterator of epoch {self.epoch} was closed at step {self._step} (a later "
                         "Pipeline.iterate() call or close() replaces it)")
    if self._step >= steps or self._it is None:
      self._release()
      raise StopIteration
    batch = next(self._it)
    grain_iterators.unlink_shared_memory(batch)
    self._step += 1
    if self._step == steps:
      self._release()  # the workers are already busy with the next epoch: keep them for it
    self._pipeline.note_bad(batch.pop("bad_index"), batch.pop("bad_reason"))
    self._pipeline.downscaled += int(batch.pop("downscaled").sum())
    if "crops" in batch:
      batch["crops"] = list(batch["crops"])
    return batch

  def _release(self):
    if self._it is not None:
      self._pipeline._keep_spare(self._it, (self.epoch + 1) * self._pipeline.steps_per_epoch, self._stop)
      self._it = None

  def close(self):
    """Stops this iterator's workers (an iterator left mid-epoch owns them)."""
    if self._it is not None:
      grain_iterators.close(self._it)
      self._it = None
      self._closed = self._step < self._pipeline.steps_per_epoch


class Pipeline:
  """Multi-crop training batches for this process, of a config that config.validate has checked.

  Attributes: num_examples, global_batch, local_batch, steps_per_epoch, num_classes (None if unknown),
  crops (`data.crops` as tuples), source.

  `iterate(epoch, start_step)` yields dict(crops=[uint8 [local_batch, count, size, size, 3] per crop group],
  index=int32 [local_batch] (dataset index, -1 for an undecodable sample whose crops are zeros),
  label=int32 [local_batch] (-1 unknown)); with device crops (data.crops_on), image, image_size and boxes in
  place of crops (train_batch_shapes). Where a run is needs no state of its own: batch s of epoch e is
  a function of (seed, e, s), so a resumed run calls iterate(step // steps_per_epoch, step % steps_per_epoch).
  """

  def __init__(self, config, process_index: int | None = None, process_count: int | None = None, source=None):
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top  (late: the grain workers import this module, and
      #            they need numpy and PIL only)
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    data = config.data
    self.crops = crop_groups(data.crops)
    self.source = sources.make_source(data) if source is None else source
    self.num_examples = len(self.source)
    self.num_classes = getattr(self.source, "num_classes", None)
    self.global_batch = int(config.batch_size)
    self.local_batch = self.global_batch // process_count
    self.steps_per_epoch = steps_per_epoch(self.num_examples, self.global_batch)
    self.process_index, self.process_count = process_index, process_count
    self._num_epochs = max(1, int(config.num_epochs))
    self._num_workers = int(data.num_workers)
    self._threads = int(data.threads_per_worker)
    self._prefetch = int(data.prefetch)
    import jax  # pylint: disable=g-import-not-at-top  (late, as above)
    self.crops_on, self.canvas = crops_on(config, jax.default_backend()), canvas_size(data)
    self.loader = TrainBatchLoader(
        self.source, seed=int(config.seed), crops=self.crops,
        host_augment_cfg=_plain_augment_cfg(config.augment) if config.augment.where == "host" else None,
        num_examples=self.num_examples, global_batch=self.global_batch, local_batch=self.local_batch,
        process_index=process_index, steps_per_epoch=self.steps_per_epoch, where=self.crops_on, canvas=self.canvas)
    self.downscaled = 0                        # samples larger than the canvas, downscaled first (device crops)
    self._spare = None  # (grain iterator, its next global batch number, its stop) left by a finished epoch
    self._current: EpochIterator | None = None
    self.bad_samples: dict[int, str] = {}    # dataset index -> why it did not decode (this process's share)

  def note_bad(self, indices, reasons) -> None:
    """Records a batch's undecodable samples; each new one is reported once per run, not every epoch."""
    for i, reason in zip(indices, reasons):
      i = int(i)
      if i >= 0 and i not in self.bad_samples:
        self.bad_samples[i] = str(reason)
        log.warning("skipping undecodable sample %s (%s); reported once, skipped every epoch",
                    self.source.describe(i), reason)

  def bank_pass(self) -> "EpochIterator":
    """The memory bank's initial pass: epoch 0's batches (so every sample epoch 0 trains on gets a target, as
    in the reference), its crops drawn as in BANK_PASS_EPOCH, apart from every training epoch's."""
    return self.iterate(0, crop_epoch=BANK_PASS_EPOCH)

  def iterate(self, epoch: int, start_step: int = 0, crop_epoch: int | None = None) -> EpochIterator:
    """The batches of `epoch` from `start_step` (crop_epoch: draw the crops as in that epoch instead).

    Closes the previous iterator of this Pipeline if it is unfinished (using it afterwards raises).
    """
    if epoch < 0:
      raise ValueError(f"epoch must be >= 0, got {epoch}")
    if self._current is not None:
      self._current.close()  # one live iterator per Pipeline: an abandoned one must not keep its workers
    if not 0 <= start_step <= self.steps_per_epoch:
      raise ValueError(f"start_step {start_step} not in [0, {self.steps_per_epoch}]")
    first = epoch * self.steps_per_epoch + start_step
    if crop_epoch is None and self._spare is not None and self._spare[1] == first:
      it, _, stop = self._spare
      self._spare = None
    else:
      self._close_spare()
      # Other crops: one epoch only, so that its iterator never serves a training epoch as the spare.
      stop = (max(self._num_epochs, epoch + 1) if crop_epoch is None else epoch + 1) * self.steps_per_epoch
      loader = self.loader if crop_epoch is None else self.loader.with_crop_epoch(crop_epoch)
      it = grain_iterators.grain_iterator(loader, first, stop, self._num_workers, self._threads, self._prefetch)
    self._current = EpochIterator(self, epoch, start_step, it, stop)
    return self._current

  def _keep_spare(self, it, next_batch: int, stop: int) -> None:
    self._close_spare()
    if next_batch >= stop:       # exhausted: an epoch past num_epochs gets a fresh iterator, not an empty one
      grain_iterators.close(it)
      return
    self._spare = (it, next_batch, stop)

  def _close_spare(self) -> None:
    if self._spare is not None:
      grain_iterators.close(self._spare[0])
      self._spare = None

  def close(self) -> None:
    """Stops the worker processes."""
    self._close_spare()
    if self._current is not None:
      self._current.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class EvalBatchLoader:
  """Batch number -> evaluation images (transforms.eval_view) of this process's share of rows, padded."""

  def __init__(self, source, rows: np.ndarray, batch_size: int, image_size: int, view: str):
    self.source, self.rows = source, rows
    self.batch_size, self.image_size, self.view = batch_size, image_size, view

  def __call__(self, b: int) -> dict:
    n, s = self.batch_size, self.image_size
    out = dict(image=np.zeros((n, s, s, 3), np.uint8), label=np.full((n,), -1, np.int32),
               index=np.full((n,), -1, np.int32), valid=np.zeros((n,), bool))
    for row, i in enumerate(self.rows[int(b) * n:(int(b) + 1) * n]):
      i = int(i)
      try:
        example = self.source[i]
        out["image"][row] = transforms.eval_view(example["image"], s, self.view)
      except Exception as e:  # pylint: disable=broad-except
        log.warning("skipping undecodable sample %s: %s: %s", self.source.describe(i), type(e).__name__, e)
        continue
      out["label"][row], out["index"][row], out["valid"][row] = example["label"], i, True
    return out


def eval_batches(data_cfg, split: str, batch_size: int, image_size: int, process_index: int | None = None,
                 process_count: int | None = None, *, view: str = "center_crop", max_samples: int = 0,
                 seed: int = 0) -> Iterator[dict]:
  """Every sample of `split` once, as dict(image=uint8 [b, S, S, 3], label, index (int32), valid (bool)).

  Images: `view` (transforms.EVAL_VIEWS): Resize round(S * 256 / 224) + CentreCrop S (torchvision's evaluation
  transform), or the whole image resized to S x S. max_samples > 0: a fixed random subset of that many
  samples (the same for every call with the same seed), in index order. Process p takes the contiguous share
  [p * ceil(N/P), (p+1) * ceil(N/P)) of the rows; every process yields the same number of batches, each padded
  to batch_size with valid=False (and undecodable samples are valid=False, index -1), so a jitted feature
  extractor sees the same shapes everywhere.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (late: see Pipeline.__init__)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  source = sources.make_source(data_cfg, split)
  rows = np.arange(len(source))
  if 0 < max_samples < len(source):
    rows = np.sort(np.random.default_rng(seed).choice(len(source), max_samples, replace=False))
  share = math.ceil(len(rows) / process_count)
  mine = rows[min(process_index * share, len(rows)):min((process_index + 1) * share, len(rows))]
  num_batches = max(1, math.ceil(share / batch_size))
  loader = EvalBatchLoader(source, mine, batch_size, image_size, view)
  it = grain_iterators.grain_iterator(loader, 0, num_batches, int(data_cfg.get("num_workers", 0)),
                       int(data_cfg.get("threads_per_worker", 1)), int(data_cfg.get("prefetch", 2)))

  return _SizedBatches(it, num_batches)


class _SizedBatches:
  """An iterator that knows its length (progress bars and ETAs) and closes its workers when done."""

  def __init__(self, it, num_batches: int):
    self._it, self._left = it, num_batches

  def __len__(self) -> int:
    return self._left

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._left <= 0:
      self.close()
      raise StopIteration
    try:
      batch = next(self._it)
    except BaseException:
      self.close()
      raise
    grain_iterators.unlink_shared_memory(batch)
    self._left -= 1
    return batch

  def close(self) -> None:
    if self._it is not None:
      grain_iterators.close(self._it)
      self._it = None
