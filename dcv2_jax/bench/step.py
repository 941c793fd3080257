"""`python -m dcv2_jax.bench step`: the full DCv2 train step (RN50 bf16; 2x224, 2x160+4x96, 2x224+6x96) on
synthetic uint8 crops already on the devices, next to the plain Flax supervised step measured in the same run.

Figures: step_ms, img_per_s (crops of any size), img224_per_s (crops weighted by (size/224)^2, comparable with a
supervised 224 px step), samples_per_s, compile_s, peak_mem_gb, vs_supervised_img224.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dcv2_jax import augment
from dcv2_jax.bench import RECIPE_CROPS, baseline, run_programs
from dcv2_jax.bench.report import emit, guarded, images224, peak_memory_gib, time_calls
from dcv2_jax.config import base_config
from dcv2_jax.conventions import DTYPES
from dcv2_jax.sharding import batch_sharded, make_mesh, replicated

CROPS = RECIPE_CROPS


def dcv2_step(crops, batch: int, depth: int, base_width: int, dtype: str, steps: int, warmup: int,
              num_clusters: int, bank_steps: int, jitter_order: str = "random", trace_dir=None,
              crops_on: str = "host") -> dict:
  c = base_config()
  c.batch_size, c.num_epochs = batch, 10
  c.data.crops, c.data.crops_on = crops, crops_on
  c.augment.jitter_order = jitter_order
  c.model.depth, c.model.base_width, c.model.dtype = depth, base_width, dtype
  c.model.head_dims = (max(8 * base_width, 16) * 4, 128) if base_width < 64 else (2048, 128)
  c.loss.num_clusters = (num_clusters,) * 3
  programs = run_programs.build(c, make_mesh(), bank_steps * batch)
  train = lambda s, b: (lambda new, *out: (new, out))(*programs.steps.train(s, b))     # (state, (metrics, control))
  compile_s, ms = time_calls(train, run_programs.synthetic_state(programs), (run_programs.synthetic_batch(programs),),
                             steps, warmup, trace_dir)
  n_img = sum(int(n) for _, n, *_ in crops) * batch
  n_224 = images224(crops) * batch
  return {"step_ms": round(ms, 2), "img_per_s": round(n_img / ms * 1e3, 1),
          "img224_per_s": round(n_224 / ms * 1e3, 1), "samples_per_s": round(batch / ms * 1e3, 1),
          "compile_s": round(compile_s, 1), "peak_mem_gb": peak_memory_gib()}


def supervised_step(batch: int, size: int, depth: int, base_width: int, dtype: str, steps: int, warmup: int) -> dict:
  """The baseline (bench/baseline.py): plain Flax ResNet, Linear 1000, cross-entropy, SGD momentum."""
  init, step = baseline.supervised_step(depth, base_width, DTYPES[dtype])
  mesh = make_mesh()
  x = jax.device_put(jax.random.normal(jax.random.key(1), (batch, size, size, 3)), batch_sharded(mesh))
  y = jax.device_put(jnp.arange(batch) % 1000, batch_sharded(mesh))
  state = jax.jit(init, out_shardings=replicated(mesh))(jax.random.key(0), x)
  compile_s, ms = time_calls(jax.jit(step, donate_argnums=0), state, (x, y), steps, warmup)
  return {"step_ms": round(ms, 2), "img_per_s": round(batch / ms * 1e3, 1),
          "img224_per_s": round(batch * (size / 224) ** 2 / ms * 1e3, 1), "compile_s": round(compile_s, 1),
          "peak_mem_gb": peak_memory_gib()}


def add_arguments(parser) -> None:
  parser.add_argument("--crops", default=",".join(CROPS), help=f"comma-separated of {', '.join(CROPS)}")
  parser.add_argument("--batch", type=int, default=128, help="samples per DCv2 step")
  parser.add_argument("--baseline_batch", type=int, default=256, help="images per supervised step")
  parser.add_argument("--jitter_orders", default="random",
                      help="comma-separated of random (torchvision's order per image), fixed")
  parser.add_argument("--trace", default="", help="write a jax.profiler trace of the timed steps here")
  parser.add_argument("--crops_on", default="host",
                      help="comma-separated of host (uint8 crops in), device (images on the canvas and boxes in: the "
                           "step cuts the crops, data.crops_on=device)")


def check_arguments(args) -> dict:
  return {"--crops": (args.crops, tuple(CROPS)), "--jitter_orders": (args.jitter_orders, augment.JITTER_ORDERS),
          "--crops_on": (args.crops_on, ("host", "device"))}


_BASELINES: dict = {}   # supervised-step results of this process, by their arguments: `all` runs several cases


def run(args) -> list[dict]:
  depth, width, scale = (18, 8, 1 / 7) if args.quick else (50, 64, 1.0)
  batch, base_batch = (8, 8) if args.quick else (args.batch, args.baseline_batch)
  steps, warmup = (2, 1) if args.quick else (args.steps, args.warmup)
  size = lambda s: max(16, int(round(s * scale / 8)) * 8)
  base_key = (base_batch, size(224), depth, width, args.dtype, steps, warmup)
  if base_key not in _BASELINES:
    _BASELINES[base_key] = guarded(lambda: supervised_step(*base_key))
  base = _BASELINES[base_key]
  results = [emit({"bench": "supervised_step", "batch": base_batch, "size": size(224), "depth": depth,
                   "dtype": args.dtype, **base})]
  for name in [c for c in args.crops.split(",") if c]:
    for order in [o for o in args.jitter_orders.split(",") if o]:
      for where in [w for w in args.crops_on.split(",") if w]:
        crops = tuple((size(s), n, lo, hi) for s, n, lo, hi in CROPS[name])
        r = guarded(lambda: dcv2_step(crops, batch, depth, width, args.dtype, steps, warmup,
                                      num_clusters=30 if args.quick else 3000, bank_steps=4 if args.quick else 100,
                                      jitter_order=order, trace_dir=args.trace or None, crops_on=where))
        if "img224_per_s" in r and "img224_per_s" in base:
          r["vs_supervised_img224"] = round(r["img224_per_s"] / base["img224_per_s"], 3)
        results.append(emit({"bench": "dcv2_step", "crops": name, "jitter_order": order, "crops_on": where,
                             "batch": batch, "depth": depth, "dtype": args.dtype, **r}))
  return results
