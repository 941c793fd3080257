"""`python -m dcv2_jax.bench augment`: the on-device colour augmentation alone (the step's colour ops at the
default config's probabilities: flip, jitter in random or fixed order, grayscale, blur, normalisation), on 512
crops at 224, 256 at 224 and 1536 at 96; target: <= 3 ms per 512 crops at 224 on one H100."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dcv2_jax import augment
from dcv2_jax.bench.report import emit, guarded, time_calls
from dcv2_jax.config import base_config
from dcv2_jax.sharding import batch_sharded, make_mesh


def colour_ops(count: int, size: int, jitter_order: str, dtype: str, steps: int, warmup: int) -> dict:
  cfg = base_config().augment
  cfg.jitter_order = jitter_order
  images = jax.device_put(np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8),
                          batch_sharded(make_mesh()))
  # The keys change every call (a counter in the carried state), so no call can be served from a cache.
  fn = jax.jit(lambda i, x: (i + 1, augment.device_augment(
      x, jax.random.split(jax.random.fold_in(jax.random.key(0), i), count), cfg, jnp.dtype(dtype))))
  compile_s, ms = time_calls(fn, jnp.int32(0), (images,), steps, warmup)
  return {"ms": round(ms, 3), "ms_per_512_at_224": round(ms * 512 / count * (224 / size) ** 2, 3),
          "compile_s": round(compile_s, 1)}


def add_arguments(parser) -> None:
  parser.add_argument("--jitter_orders", default="random",
                      help="comma-separated of random (torchvision's order per image), fixed")


def check_arguments(args) -> dict:
  return {"--jitter_orders": (args.jitter_orders, augment.JITTER_ORDERS)}


def run(args) -> list[dict]:
  cases = ((16, 32), (48, 16)) if args.quick else ((512, 224), (256, 224), (1536, 96))
  steps, warmup = (2, 1) if args.quick else (args.steps, args.warmup)
  return [emit({"bench": "augment", "crops": count, "size": size, "jitter_order": order,
                **guarded(lambda: colour_ops(count, size, order, args.dtype, steps, warmup))})
          for count, size in cases for order in [o for o in args.jitter_orders.split(",") if o]]
