"""What every benchmark shares: one JSON line per result with the machine it came from, the timing loop, and
cases that fail without stopping the ones after them."""
from __future__ import annotations

import json
import time

import jax

GIB = 2 ** 30
# perf.md's anchor: the plain Flax ResNet-50 train step on one H100 (bf16, batch 256 at 224 px) ran 5,653 img/s.
# Estimates of what an H100 consumes, or how long a recipe takes, scale it by 224 px images (images224).
H100_ANCHOR_IMG224_PER_S = 5653


def images224(crops) -> float:
  """One sample's crops (data.crops rows: size, count, ...) counted in 224 px images, weighted by (size / 224)^2
  (a ResNet's work grows with the pixels): comparable with a supervised 224 px image."""
  return sum(int(n) * (int(s) / 224) ** 2 for s, n, *_ in crops)


def device_info() -> dict:
  d = jax.devices()[0]
  return {"device": getattr(d, "device_kind", d.platform), "num_devices": jax.device_count(),
          "jax": jax.__version__}


def emit(record: dict) -> dict:
  """Prints one result as a JSON line (with the device it ran on) at once, so a run cut short keeps it."""
  print(json.dumps({**record, **device_info()}), flush=True)
  return record


def guarded(fn) -> dict:
  """fn()'s figures, or {'error': ...}: one case that fails (a kernel the compiler rejects, memory) must not
  cost a GPU run the cases after it."""
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except
    return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def peak_memory_gib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else round(peak / GIB, 2)


def time_calls(fn, state, args, steps: int, warmup: int, trace_dir: str | None = None) -> tuple[float, float]:
  """(compile seconds, ms per call) of state, out = fn(state, *args): the first call (compile) and `warmup`
  calls first, then `steps` timed calls back to back; trace_dir: a jax.profiler trace of the timed calls."""
  t0 = time.perf_counter()
  state, out = fn(state, *args)
  jax.block_until_ready(out)
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, out = fn(state, *args)
  jax.block_until_ready((state, out))
  if trace_dir:
    jax.profiler.start_trace(trace_dir)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, out = fn(state, *args)
  jax.block_until_ready((state, out))
  ms = (time.perf_counter() - t0) / steps * 1e3
  if trace_dir:
    jax.profiler.stop_trace()
  return compile_s, ms
