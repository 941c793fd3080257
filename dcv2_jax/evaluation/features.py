"""Pooled trunk features of a dataset split, extracted once per evaluation (the trunk is frozen).

Images come from `dcv2_jax.data.eval_batches` (resize + centre crop, no augmentation), are normalised as
the network was trained, and go through `apply_fn(variables, x)` under jit with each batch split over the
mesh's data axis. Every process gets all rows (the outputs are replicated).
"""
from __future__ import annotations

import functools
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dcv2_jax import data
from dcv2_jax import sharding as shd
from dcv2_jax.run import distributed
from dcv2_jax.run.metric_writer import format_eta


def pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  pad = n - x.shape[0]
  return x if pad == 0 else np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])


@functools.lru_cache(maxsize=16)
def forward_program(apply_fn: Callable, mean: tuple, std: tuple, mesh):
  """The jitted, normalising forward of a batch (image uint8, label, index, valid -> features, label, index,
  valid); cached, so that a run's repeated evaluations (the live kNN) compile it once."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

  def forward(variables, image, label, index, valid):
    x = (image.astype(jnp.float32) / 255.0 - mean) / std
    return apply_fn(variables, x).astype(jnp.float32), label, index, valid

  # Replicated outputs: np.asarray works on every process, also multi-host.
  return distributed.jit(forward, out_shardings=shd.replicated(mesh))


def extract_features(apply_fn: Callable, variables, batches: Iterable[dict], mesh=None, *, mean, std,
                     total: int | None = None, progress: bool = True):
  """Pooled features of every valid row of `batches`: (features [n, F] float32, labels [n], indices [n]).

  batches: dicts with image uint8 [b, S, S, 3] (this process's rows), and optionally label int [b]
  (default -1), index int [b] (default running count), valid bool [b] (default all True).
  Images become float32 in [0, 1], normalised by mean/std, then go through `apply_fn(variables, x)`.
  Rows come back in batch order, process-major within a batch.
  """
  mesh = shd.make_mesh() if mesh is None else mesh
  # A process feeds rows to its own devices only: pad its rows to a multiple of them.
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  fwd = forward_program(apply_fn, tuple(float(v) for v in mean), tuple(float(v) for v in std), mesh)
  variables = jax.device_put(variables, shd.replicated(mesh))
  if total is None and hasattr(batches, "__len__"):
    total = len(batches)
  report = progress and jax.process_index() == 0

  feats, labels, indices = [], [], []
  count = 0

  def collect(out):
    f, lab, i, v = (np.asarray(a) for a in out)
    feats.append(f[v]), labels.append(lab[v]), indices.append(i[v])

  pending, start = None, time.time()
  for step, batch in enumerate(batches):
    image = np.asarray(batch["image"])
    b = image.shape[0]
    label = np.asarray(batch.get("label", np.full(b, -1)), np.int32)
    index = np.asarray(batch.get("index", np.arange(count, count + b)), np.int32)
    valid = np.asarray(batch.get("valid", np.ones(b, bool)), bool)
    count += b
    n = -(-b // local_devices) * local_devices
    local = tuple(pad_rows(a, n) for a in (image, label, index, valid))  # padding has valid=False
    out = fwd(variables, *shd.local_batch_to_global(local, mesh))
    # Dispatch this batch before fetching the previous one, so the device never waits for the host.
    if pending is not None:
      collect(pending)
    pending = out
    if report and step % 100 == 99:
      rate = (step + 1) / (time.time() - start)
      logging.info("features: %d/%s batches, %.1f batch/s, ETA %s", step + 1, total or "?", rate,
                   format_eta((total - step - 1) / rate) if total else "?")
  if pending is not None:
    collect(pending)
  if not feats:
    raise ValueError("extract_features: no batches")
  return np.concatenate(feats), np.concatenate(labels), np.concatenate(indices)


def extract_split(apply_fn, variables, data_cfg, split: str, *, image_size: int, view: str, mean, std,
                  batch_size: int = 256, max_samples: int = 0, mesh=None, batches_fn: Callable | None = None,
                  progress: bool = True):
  """extract_features over a split of the configured dataset (or a fixed subset of max_samples of it) ->
  (features, labels, indices).

  batches_fn defaults to dcv2_jax.data.eval_batches, which yields batch_size rows per process (each process
  its own contiguous share of the split), seen at image_size as `view` (transforms.EVAL_VIEWS).
  """
  if batches_fn is None:
    batches = data.eval_batches(data_cfg, split, batch_size, image_size, view=view, max_samples=max_samples)
  else:
    batches = batches_fn(data_cfg, split, batch_size, image_size)
  return extract_features(apply_fn, variables, batches, mesh, mean=mean, std=std, progress=progress)
