"""Where the trainer's numbers go: metrics.jsonl, TensorBoard, and a progress line with an ETA.

Only process 0 writes; the other processes get a writer that drops everything.
"""
from __future__ import annotations

import json
import math
import os
import time

from absl import logging
from tensorboardX import SummaryWriter

from dcv2_jax.sharding import to_python

TENSORBOARD_STALL_S = 30.0    # the longest an event waits for room in TensorBoard's queue while its thread lives


class MetricWriter:
  """Appends records to <workdir>/metrics.jsonl and TensorBoard. A write that fails (a full disk) warns
  once and the writer goes quiet: metrics are never worth stopping a run for, and the checkpoint save
  that the same disk fails next reports the cause.

  tensorboardX writes from a thread fed by a bounded queue; a failed write (a full disk) kills that thread
  silently and the 11th event after it blocks the trainer forever (seen: a full-disk run hung in
  add_scalar). So every event waits for room in the queue only while the thread lives, and a dead thread
  turns TensorBoard off with a warning (metrics.jsonl carries on).
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    record = to_python(record)
    try:
      with open(self.path, "a") as f:
        f.write(json.dumps(record, allow_nan=True) + "\n")
    except OSError as e:
      self._failed(e)
      return
    step = record.get("step", 0)
    for key, value in _flatten(record):
      if key != "step" and isinstance(value, (int, float)) and math.isfinite(value) and self._tb_ready():
        self._tb.add_scalar(key, value, step)

  def image(self, tag: str, image, step: int) -> None:
    """A uint8 [H, W, 3] picture to TensorBoard's image tab."""
    if self.enabled and self._tb_ready():
      self._tb.add_image(tag, image, step, dataformats="HWC")

  def _tb_ready(self) -> bool:
    """Whether TensorBoard's writer thread can take one more event without blocking for good (class doc)."""
    if self._tb is None:
      return False
    # tensorboardX has no public handle on its thread or queue (the reason for the private names).
    events = self._tb._get_file_writer().event_writer  # pylint: disable=protected-access
    deadline = time.monotonic() + TENSORBOARD_STALL_S
    while events._worker.is_alive() and events._event_queue.full() and time.monotonic() < deadline:  # pylint: disable=protected-access
      time.sleep(0.01)
    if events._worker.is_alive() and not events._event_queue.full():  # pylint: disable=protected-access
      return True
    logging.warning("metrics: TensorBoard's writer in %s stopped (a full disk? its error is in train.log); "
                    "TensorBoard gets no more events from this process, metrics.jsonl still does",
                    os.path.join(os.path.dirname(self.path), "tensorboard"))
    self._tb = None         # never closed: its close() would wait on the dead thread
    return False

  def _failed(self, error: OSError) -> None:
    logging.warning("metrics: writing %s failed (%s); no more metrics are written by this process",
                    self.path, error)
    self.enabled = False

  def close(self) -> None:
    if self._tb is not None and self._tb_ready():
      try:
        self._tb.close()
      except OSError as e:
        self._failed(e)
    self._tb = None


def _flatten(record, prefix=""):
  for k, v in record.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict):
      yield from _flatten(v, name + "/")
    elif isinstance(v, list):
      for i, x in enumerate(v):
        yield f"{name}/{i}", x
    else:
      yield name, v


class Progress:
  """Throughput and ETA over the steps since the last report."""

  def __init__(self, total_steps: int, start_step: int, samples_per_step: int, images_per_step: int):
    self.total, self.samples, self.images = total_steps, samples_per_step, images_per_step
    self._t, self._step = time.time(), start_step

  def report(self, step: int) -> dict:
    now = time.time()
    dt, n = max(now - self._t, 1e-9), step - self._step
    self._t, self._step = now, step
    steps_per_s = n / dt if n else 0.0
    eta = (self.total - step) / steps_per_s if steps_per_s else float("nan")
    return {"steps_per_s": steps_per_s, "samples_per_s": steps_per_s * self.samples,
            "img_per_s": steps_per_s * self.images, "eta_s": eta}


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
