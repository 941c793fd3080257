"""Benchmarks that print one JSON line per result.

  python -m dcv2_jax.bench step        # full DCv2 train step, RN50 bf16, 2x224 | 2x160+4x96 | 2x224+6x96,
                                       # next to a plain supervised RN50 step measured in the same run
  python -m dcv2_jax.bench kmeans      # all heads at ImageNet scale (1,281,167 x 128, 3 x 3000, 10 iters)
  python -m dcv2_jax.bench augment     # on-device colour augmentation alone: 512@224, 256@224, 1536@96
  python -m dcv2_jax.bench assign      # one nearest-centroid pass: XLA vs the fused kernel's block configs
  python -m dcv2_jax.bench pipeline    # input pipeline samples/s per CPU core (dcv2_jax.data.benchmark)
  python -m dcv2_jax.bench all         # the GPU check: the cases above that matter most, most important first
  python -m dcv2_jax.bench recipe --config configs/cifar10.py   # a recipe's train step: its FLOPs, an H100
                                       # estimate of its run time from them, and (--steps N) its time here
  python -m dcv2_jax.bench step --quick   # tiny sizes (CPU smoke test)

Everything runs on synthetic data already on the device (uint8 crops for the DCv2 step), so the figures
are the accelerator's; the pipeline benchmark gives the CPU side. Step figures: step_ms, img_per_s (crops
of any size), img224_per_s (crops weighted by (size/224)^2), samples_per_s, compile_s, peak_mem_gb.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcv2_jax import augment, cli, kmeans, kmeans_kernel, memory_bank
from dcv2_jax import config as config_lib
from dcv2_jax.config import base_config
from dcv2_jax.data import benchmark as data_benchmark
from dcv2_jax.epoch_steps import jit_epoch_steps
from dcv2_jax.models import DTYPES, STAGES
from dcv2_jax.sharding import batch_sharded, local_batch_to_global, make_mesh, replicated
from dcv2_jax.train_state import make_spec

CROPS = {"2x224": ((224, 2, 0.08, 1.0),), "2x160+4x96": ((160, 2, 0.08, 1.0), (96, 4, 0.05, 0.14)),
         "2x224+6x96": ((224, 2, 0.14, 1.0), (96, 6, 0.05, 0.14))}


def _device_info() -> dict:
  d = jax.devices()[0]
  return {"device": getattr(d, "device_kind", d.platform), "num_devices": jax.device_count(),
          "jax": jax.__version__}


def _peak_gb():
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else round(peak / 2 ** 30, 2)


TRACE_DIR = None   # --trace DIR: a jax.profiler trace of every timed loop (open with TensorBoard/Perfetto)


def _time(fn, state, args, steps: int, warmup: int):
  """(compile seconds, ms per step): compile + warm-up first, then `steps` timed calls back to back."""
  t0 = time.perf_counter()
  state, out = fn(state, *args)
  jax.block_until_ready(out)
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, out = fn(state, *args)
  jax.block_until_ready((state, out))
  if TRACE_DIR:
    jax.profiler.start_trace(TRACE_DIR)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, out = fn(state, *args)
  jax.block_until_ready((state, out))
  ms = (time.perf_counter() - t0) / steps * 1e3
  if TRACE_DIR:
    jax.profiler.stop_trace()
  return compile_s, ms


def bench_dcv2_step(crops, batch: int, depth: int, base_width: int, dtype: str, steps: int, warmup: int,
                    num_clusters: int, bank_steps: int, jitter_order: str = "random") -> dict:
  c = base_config()
  c.batch_size, c.num_epochs = batch, 10
  c.data.crops = crops
  c.augment.jitter_order = jitter_order
  c.model.depth, c.model.base_width, c.model.dtype = depth, base_width, dtype
  c.model.head_dims = (max(8 * base_width, 16) * 4, 128) if base_width < 64 else (2048, 128)
  c.loss.num_clusters = (num_clusters,) * 3
  mesh = make_mesh()
  spec = make_spec(c, num_examples=bank_steps * batch, steps_per_epoch=bank_steps)
  steps_ = jit_epoch_steps(spec, mesh)
  state = steps_.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  cents = rng.normal(size=state.centroids.shape).astype(np.float32)
  cents /= np.linalg.norm(cents, axis=-1, keepdims=True)
  state = state.replace(centroids=jax.device_put(cents, state.centroids.sharding),
                        table=jax.device_put(rng.integers(0, num_clusters, state.table.shape, dtype=np.int32),
                                             state.table.sharding))
  local = jax.process_count() and batch // jax.process_count()
  data = {"crops": [rng.integers(0, 256, (local, int(n), int(s), int(s), 3), dtype=np.uint8) for s, n, *_ in crops],
          "index": np.arange(local, dtype=np.int32), "label": np.zeros(local, np.int32)}
  gbatch = local_batch_to_global(data, mesh)
  train = lambda s, b: (lambda new, *out: (new, out))(*steps_.train(s, b))     # (state, (metrics, control))
  compile_s, ms = _time(train, state, (gbatch,), steps, warmup)
  n_img = sum(int(n) for _, n, *_ in crops) * batch
  n_224 = sum(int(n) * (int(s) / 224) ** 2 for s, n, *_ in crops) * batch
  return {"step_ms": round(ms, 2), "img_per_s": round(n_img / ms * 1e3, 1),
          "img224_per_s": round(n_224 / ms * 1e3, 1), "samples_per_s": round(batch / ms * 1e3, 1),
          "compile_s": round(compile_s, 1), "peak_mem_gb": _peak_gb()}


def plain_flax_classifier(depth: int, base_width: int, dtype):
  """The baseline network: a ResNet written the plain Flax way (flax's examples/imagenet style: nn.Conv,
  nn.BatchNorm with its fast variance, 'SAME' pooling), independent of our trunk, so the comparison is
  with what a Flax user gets without this project, as perf.md's anchor was measured."""
  kind, blocks = STAGES[depth]
  expansion = 4 if kind == "bottleneck" else 1

  class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      conv = lambda f, k, s=1: nn.Conv(f, (k, k), (s, s), padding=[(k // 2, k // 2)] * 2, use_bias=False,
                                       dtype=dtype)
      norm = lambda **kw: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                                       **kw)
      x = nn.relu(norm()(conv(base_width, 7, 2)(x.astype(dtype))))
      x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
      for stage, n in enumerate(blocks):
        planes = base_width * 2 ** stage
        for i in range(n):
          stride = 2 if stage > 0 and i == 0 else 1
          shapes = ((planes, 1, 1), (planes, 3, stride), (planes * 4, 1, 1)) if expansion == 4 else \
              ((planes, 3, stride), (planes, 3, 1))
          y = x
          for j, (f, k, s) in enumerate(shapes):
            y = norm(scale_init=nn.initializers.zeros if j == len(shapes) - 1 else nn.initializers.ones)(
                conv(f, k, s)(y))
            y = nn.relu(y) if j < len(shapes) - 1 else y
          if x.shape[-1] != planes * expansion or stride != 1:
            x = norm()(conv(planes * expansion, 1, stride)(x))
          x = nn.relu(x + y)
      x = jnp.mean(x, axis=(1, 2))
      return nn.Dense(1000, dtype=dtype)(x).astype(jnp.float32)

  return Classifier()


def bench_supervised_step(batch: int, size: int, depth: int, base_width: int, dtype: str, steps: int,
                          warmup: int) -> dict:
  """The baseline: plain Flax ResNet (plain_flax_classifier), Linear 1000, cross-entropy, SGD momentum."""
  model, tx = plain_flax_classifier(depth, base_width, DTYPES[dtype]), optax.sgd(0.1, momentum=0.9)
  mesh = make_mesh()
  x = jax.device_put(jax.random.normal(jax.random.key(1), (batch, size, size, 3)), batch_sharded(mesh))
  y = jax.device_put(jnp.arange(batch) % 1000, batch_sharded(mesh))
  variables = jax.jit(lambda k: model.init(k, x[:2], train=False), out_shardings=replicated(mesh))(jax.random.key(0))
  state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

  def step(state, x, y):
    params, bs, opt = state

    def loss_fn(p):
      logits, upd = model.apply({"params": p, "batch_stats": bs}, x, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

    (loss, bs), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    u, opt = tx.update(g, opt, params)
    return (optax.apply_updates(params, u), bs, opt), loss

  fn = jax.jit(step, donate_argnums=0)
  compile_s, ms = _time(fn, state, (x, y), steps, warmup)
  return {"step_ms": round(ms, 2), "img_per_s": round(batch / ms * 1e3, 1),
          "img224_per_s": round(batch * (size / 224) ** 2 / ms * 1e3, 1), "compile_s": round(compile_s, 1),
          "peak_mem_gb": _peak_gb()}


def bench_augment(count: int, size: int, jitter_order: str, dtype: str, steps: int, warmup: int) -> dict:
  """`augment.device_augment` alone on `count` uint8 crops of `size` (the step's colour ops, with the
  default config's probabilities): flip, jitter in random or fixed order, grayscale, blur, normalisation."""
  cfg = base_config().augment
  cfg.jitter_order = jitter_order
  mesh = make_mesh()
  images = jax.device_put(np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8),
                          batch_sharded(mesh))
  # The keys change every call (a counter in the carried state), so no call can be served from a cache.
  fn = jax.jit(lambda i, x: (i + 1, augment.device_augment(
      x, jax.random.split(jax.random.fold_in(jax.random.key(0), i), count), cfg, jnp.dtype(dtype))))
  compile_s, ms = _time(fn, jnp.int32(0), (images,), steps, warmup)
  return {"crops": count, "size": size, "jitter_order": jitter_order, "ms": round(ms, 3),
          "ms_per_512_at_224": round(ms * 512 / count * (224 / size) ** 2, 3), "compile_s": round(compile_s, 1)}


def bench_kmeans(n: int, dim: int, heads: int, k: int, iters: int, chunk: int, dtype: str, batch: int,
                 sums: str = "scatter", assign: str = "xla") -> dict:
  """All heads as the trainer runs them (kmeans.cluster_heads on a sharded bank of ~n rows)."""
  mesh = make_mesh()
  steps = max(1, n // batch)
  shardings = memory_bank.bank_shardings(mesh)
  make = jax.jit(lambda key: memory_bank.MemoryBank(
      z=_unit(jax.random.normal(key, (2, steps, batch, dim))), index=jnp.arange(steps * batch, dtype=jnp.int32)
      .reshape(steps, batch)), out_shardings=shardings)
  bank = make(jax.random.key(0))
  settings = kmeans.KMeansSettings(chunk_size=chunk, dtype=dtype, sums=sums, assign=assign)
  run = jax.jit(lambda b, key: kmeans.cluster_heads(key, b, (k,) * heads, iters, steps * batch, settings, mesh)[:2])
  t0 = time.perf_counter()
  jax.block_until_ready(run(bank, jax.random.key(1)))
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(3):
    t0 = time.perf_counter()
    jax.block_until_ready(run(bank, jax.random.key(2 + i)))
    times.append(time.perf_counter() - t0)
  return {"rows": steps * batch, "dim": dim, "heads": heads, "clusters": k, "iters": iters, "chunk": chunk,
          "dtype": dtype, "sums": sums, "assign": assign, "seconds": round(min(times), 4), "compile_s": round(compile_s, 1),
          "peak_mem_gb": _peak_gb()}


def bench_assign(n: int, dim: int, k: int, dtype: str, configs, steps: int) -> list[dict]:
  """One nearest-centroid pass (k-means runs 33 of them for 3 heads x 11 assignment steps): XLA's matmul +
  argmax in lloyd's chunks of 65,536 rows next to the fused kernel at each (block_rows, block_k, num_warps,
  num_stages) in `configs`. Every case scores the same rows: n rounded down to whole chunks (1,245,184 of
  1,281,167 at ImageNet scale, so no case pays for padding); kmeans_3_heads_s scales to all n rows."""
  chunk = min(n, 65536)
  rows = n // chunk * chunk
  x = _unit(jax.random.normal(jax.random.key(0), (rows, dim))).astype(dtype)
  c = _unit(jax.random.normal(jax.random.key(1), (k, dim)))
  xla = jax.jit(lambda x, c: jax.lax.map(lambda xs: kmeans._nearest(xs[None], c.astype(x.dtype), kmeans.KMeansSettings(), None),
                                         x.reshape(-1, chunk, dim)))
  cases = [("xla", xla)] + [
      (f"pallas {br}x{bk} w{nw} s{ns}",
       jax.jit(lambda x, c, cfg=(br, bk, nw, ns): kmeans_kernel.nearest(
           x, c, block_rows=cfg[0], block_k=cfg[1], num_warps=cfg[2], num_stages=cfg[3])))
      for br, bk, nw, ns in configs]
  out, ref = [], None
  for name, fn in cases:
    record = {"bench": "assign", "rows": rows, "dim": dim, "clusters": k, "dtype": dtype, "method": name}
    try:
      labels = jax.block_until_ready(fn(x, c))[0]
      t0 = time.perf_counter()
      for _ in range(steps):
        jax.block_until_ready(fn(x, c))
      ms = (time.perf_counter() - t0) / steps * 1e3
      labels = np.asarray(labels).reshape(-1)
      record.update(ms=round(ms, 3), kmeans_3_heads_s=round(ms * 33 / 1e3 * n / rows, 3))
      if name == "xla":
        ref = labels
      elif ref is not None:        # TF32 may flip a few near-ties between the two
        record["agree_with_xla"] = round(float((labels == ref).mean()), 5)
    except Exception as e:   # a configuration the compiler rejects: report it, go on with the rest
      record["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    out.append(_emit(record))
  return out


# An H100's achieved rate on a ResNet train step, for estimates from FLOPs: perf.md's plain Flax ResNet-50
# (bf16, batch 256 @224) ran 5,653 img/s, and XLA counts 23.75 GFLOP per image of that step (Lowered.
# cost_analysis, the same counter applied to the recipe's step), so about 134 TFLOP/s. Smaller images and
# networks use the GPU less well: an estimate from it is a lower bound on the time.
H100_ANCHOR_IMG_PER_S = 5653
XLA_GFLOP_PER_IMAGE_RN50 = 23.75
# Training-set sizes of the datasets the recipes name (the estimate needs steps per epoch before any data is read).
DATASET_SIZES = {"imagenet2012": 1_281_167, "imagenet100": 126_689, "cifar10": 50_000, "cifar100": 50_000,
                 "stl10": 5_000, "digits": 1_438}


def bench_recipe(config_path: str, num_examples: int, steps: int, warmup: int) -> dict:
  """A recipe's DCv2 train step at its own model, crops and global batch, on synthetic data: the FLOPs XLA counts,
  the H100 time they would take at the anchor's rate, and (steps > 0) the time it takes on this machine."""
  config, _ = config_lib.resolve(config_lib.load_file(config_path), jax.device_count())
  if num_examples <= 0:
    num_examples = DATASET_SIZES.get(config.data.name if config.data.source != "digits" else "digits", 0)
  if num_examples <= 0:
    raise cli.UsageError(f"--num_examples: the size of {config.data.name!r} is not known here; give it")
  spe = num_examples // config.batch_size
  config_lib.validate(config, num_examples, spe, jax.device_count(), jax.process_count())
  spec = make_spec(config, num_examples=num_examples, steps_per_epoch=spe)
  steps_ = jit_epoch_steps(spec, make_mesh())
  state = jax.eval_shape(steps_.init, jax.random.key(0))
  batch = {"crops": [jax.ShapeDtypeStruct((config.batch_size, int(n), int(s), int(s), 3), jnp.uint8)
                     for s, n, *_ in config.data.crops],
           "index": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32),
           "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)}
  flops = float(steps_.train.lower(state, batch).cost_analysis()["flops"])
  rate = H100_ANCHOR_IMG_PER_S * XLA_GFLOP_PER_IMAGE_RN50 * 1e9
  step_s = flops / rate
  record = {"config": config_path, "epochs": config.num_epochs, "batch": config.batch_size,
            "crops": "+".join(f"{int(n)}x{int(s)}" for s, n, *_ in config.data.crops),
            "model": f"resnet{config.model.depth}" + ("-cifar" if config.model.stem == "cifar" else ""),
            "num_examples": num_examples, "steps_per_epoch": spe, "train_gflop_per_step": round(flops / 1e9, 1),
            "h100_estimate_step_ms": round(step_s * 1e3, 2), "h100_estimate_epoch_s": round(step_s * spe, 1),
            "h100_estimate_run_h": round(step_s * spe * config.num_epochs / 3600, 2),
            "estimate_basis": "FLOPs at the plain Flax ResNet-50 anchor's 134 TFLOP/s (perf.md): a lower bound"}
  if steps > 0:
    rng = np.random.default_rng(0)
    local = config.batch_size // jax.process_count()
    data = {"crops": [rng.integers(0, 256, (local, int(n), int(s), int(s), 3), dtype=np.uint8)
                      for s, n, *_ in config.data.crops],
            "index": np.arange(local, dtype=np.int32), "label": np.zeros(local, np.int32)}
    train = lambda s, b: (lambda new, *out: (new, out))(*steps_.train(s, b))
    compile_s, ms = _time(train, steps_.init(jax.random.key(0)), (local_batch_to_global(data, make_mesh()),),
                          steps, warmup)
    record.update(step_ms=round(ms, 2), compile_s=round(compile_s, 1),
                  run_h_here=round(ms / 1e3 * spe * config.num_epochs / 3600, 1))
  return record


_BASELINES: dict = {}   # supervised-step results of this process, by their arguments


def _guarded(fn) -> dict:
  """fn()'s figures, or {'error': ...}: one case that fails (a kernel the compiler rejects, memory) must not
  cost the GPU run the cases after it."""
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except
    return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _emit(record: dict) -> dict:
  print(json.dumps({**record, **_device_info()}), flush=True)
  return record


# `bench all`, in priority order (every line is printed as soon as it is measured, so a run cut short by a
# time limit still reports what it reached): the fused k-means kernel, the 2x224 step next to the supervised
# step, the augmentation alone, the XLA k-means variants, the multi-crop steps, the cheaper jitter order.
ALL = (["assign"],
       ["kmeans", "--kmeans_assign", "pallas", "--kmeans_sums", "scatter"],
       ["step", "--crops", "2x224"],
       ["augment", "--jitter_orders", "random,fixed"],
       ["kmeans", "--kmeans_assign", "xla", "--kmeans_dtypes", "float32"],
       ["kmeans", "--kmeans_assign", "xla", "--kmeans_dtypes", "bfloat16", "--kmeans_sums", "scatter"],
       ["step", "--crops", "2x160+4x96,2x224+6x96"],
       ["step", "--crops", "2x224", "--jitter_orders", "fixed"])


def _check_inputs(args) -> None:
  """Every listed choice known before anything runs: a typo is one line, not a traceback or a JSON error line."""
  lists = {"--crops": (args.crops, tuple(CROPS)), "--jitter_orders": (args.jitter_orders, augment.JITTER_ORDERS),
           "--kmeans_dtypes": (args.kmeans_dtypes, kmeans.DTYPES), "--kmeans_sums": (args.kmeans_sums, kmeans.SUMS),
           "--kmeans_assign": (args.kmeans_assign, kmeans.ASSIGN)}
  for flag, (given, allowed) in lists.items():
    unknown = [v for v in given.split(",") if v and v not in allowed]
    if unknown:
      raise cli.UsageError(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
  if args.dtype not in DTYPES:
    raise cli.UsageError(f"--dtype {args.dtype}: choose one of {', '.join(DTYPES)}")
  bad = [b for b in args.blocks.split(",") if b and not re.fullmatch(r"\d+x\d+x\d+x\d+", b)]
  if bad:
    raise cli.UsageError(f"--blocks: {', '.join(bad)} is not block_rows x block_k x num_warps x num_stages, e.g. 128x128x8x2")
  for flag in ("batch", "baseline_batch", "steps", "kmeans_rows", "chunk"):
    if getattr(args, flag) <= 0:
      raise cli.UsageError(f"--{flag} must be > 0")


@cli.one_line_errors
def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(prog="python -m dcv2_jax.bench", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("what", choices=("step", "kmeans", "augment", "assign", "pipeline", "recipe", "all"))
  ap.add_argument("--config", help="recipe: the config file (configs/*.py, optionally file.py:arg)")
  ap.add_argument("--num_examples", type=int, default=0, help="recipe: training samples (default: known sizes)")
  ap.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke run")
  ap.add_argument("--crops", default=",".join(CROPS), help=f"step: comma-separated of {', '.join(CROPS)}")
  ap.add_argument("--batch", type=int, default=128, help="step: samples per step (DCv2)")
  ap.add_argument("--baseline_batch", type=int, default=256, help="step: images per supervised step")
  ap.add_argument("--jitter_orders", default="random",
                  help="step, augment: comma-separated of random (torchvision's order per image), fixed")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--warmup", type=int, default=5)
  ap.add_argument("--kmeans_rows", type=int, default=1_281_167)
  ap.add_argument("--kmeans_dtypes", default="float32,bfloat16")
  ap.add_argument("--kmeans_sums", default="scatter,onehot")
  ap.add_argument("--kmeans_assign", default="xla,pallas",
                  help="kmeans: xla (matmul + argmax), pallas (fused kernel; interpreted, slowly, off GPU)")
  ap.add_argument("--chunk", type=int, default=65536)
  ap.add_argument("--blocks", default="128x128x8x2,64x128x4x2,128x64x4x3,256x64x8x3",
                  help="assign: fused-kernel configs block_rows x block_k x num_warps x num_stages")
  ap.add_argument("--trace", default="", help="step: write a jax.profiler trace of the timed steps here")
  args, rest = ap.parse_known_args(argv)
  _check_inputs(args)
  global TRACE_DIR
  TRACE_DIR = args.trace or None
  results = []
  if args.what == "all":
    passed = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "all"]
    return [r for case in ALL for r in main(case + passed)]
  if args.what == "pipeline":
    return data_benchmark.main((["--quick"] if args.quick else []) + rest)
  if rest:
    ap.error(f"unknown arguments {rest}")
  orders = [o for o in args.jitter_orders.split(",") if o]
  if args.what == "recipe":
    if not args.config:
      raise cli.UsageError("recipe: give --config")
    steps = args.steps if "--steps" in (argv if argv is not None else sys.argv[1:]) else 0
    return [_emit({"bench": "recipe", **bench_recipe(args.config, args.num_examples, steps, args.warmup)})]
  if args.what == "step":
    depth, width, scale = (18, 8, 1 / 7) if args.quick else (50, 64, 1.0)
    batch, base_batch = (8, 8) if args.quick else (args.batch, args.baseline_batch)
    steps, warmup = (2, 1) if args.quick else (args.steps, args.warmup)
    size = lambda s: max(16, int(round(s * scale / 8)) * 8)
    base_key = (base_batch, size(224), depth, width, args.dtype, steps, warmup)
    if base_key not in _BASELINES:     # measured once per process: `all` runs several step cases
      _BASELINES[base_key] = _guarded(lambda: bench_supervised_step(*base_key))
    base = _BASELINES[base_key]
    results.append(_emit({"bench": "supervised_step", "batch": base_batch, "size": size(224), "depth": depth,
                          "dtype": args.dtype, **base}))
    for name in [c for c in args.crops.split(",") if c]:
      for order in orders:
        crops = tuple((size(s), n, lo, hi) for s, n, lo, hi in CROPS[name])
        r = _guarded(lambda: bench_dcv2_step(crops, batch, depth, width, args.dtype, steps, warmup,
                                             num_clusters=30 if args.quick else 3000,
                                             bank_steps=4 if args.quick else 100, jitter_order=order))
        if "img224_per_s" in r and "img224_per_s" in base:
          r["vs_supervised_img224"] = round(r["img224_per_s"] / base["img224_per_s"], 3)
        results.append(_emit({"bench": "dcv2_step", "crops": name, "jitter_order": order, "batch": batch,
                              "depth": depth, "dtype": args.dtype, **r}))
  elif args.what == "assign":
    rows, k = (512, 40) if args.quick else (args.kmeans_rows, 3000)
    configs = [tuple(int(v) for v in b.split("x")) for b in args.blocks.split(",") if b]
    if args.quick:
      configs = [(16, 32, 4, 2)]
    for dtype in args.kmeans_dtypes.split(","):
      results += bench_assign(rows, 128, k, dtype, configs, 2 if args.quick else 5)
  elif args.what == "augment":
    cases = ((16, 32), (48, 16)) if args.quick else ((512, 224), (256, 224), (1536, 96))
    steps, warmup = (2, 1) if args.quick else (args.steps, args.warmup)
    for count, size in cases:
      for order in orders:
        results.append(_emit({"bench": "augment", "crops": count, "size": size, "jitter_order": order,
                              **_guarded(lambda: bench_augment(count, size, order, args.dtype, steps, warmup))}))
  else:
    rows, k, batch = (4096, 32, 256) if args.quick else (args.kmeans_rows, 3000, 4096)
    for assign in args.kmeans_assign.split(","):
      for dtype in args.kmeans_dtypes.split(","):
        for sums in args.kmeans_sums.split(","):
          results.append(_emit({"bench": "kmeans", "assign": assign, "dtype": dtype, "sums": sums, **_guarded(
              lambda: bench_kmeans(rows, 128, 3, k, 10, min(args.chunk, rows), dtype, batch, sums, assign))}))
  return results


if __name__ == "__main__":
  main()
