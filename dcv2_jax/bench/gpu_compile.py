"""`python -m dcv2_jax.bench compile`: a run's programs compiled by XLA's CUDA compiler for GPUs this machine does
not have (deviceless ahead-of-time compilation, `jax.experimental.topologies`).

It answers most of what a first GPU run would, without one: does every program compile for the card (cuDNN
convolutions, Triton fusions, the Pallas k-means kernel, collectives), does it fit the card's memory, which
collectives does it send and in what dtype, and how many FLOPs and bytes does it move per 224 image next to a
plain Flax ResNet-50 step (bench/baseline.py). Compiled is not run: nothing here is a timing.

    python -m dcv2_jax.bench compile --config configs/dcv2_2crops.py --gpu h100 --devices 8
    python -m dcv2_jax.bench compile --config configs/dcv2_2crops.py --gpu a100-80gb,h100,h200 --devices 1 --max_batch

One JSON line per program and card (or the error's first line). Memory is per device: what the program needs
(`total`: arguments + outputs - donated + temporaries) plus what the trainer holds on the device beside it
(`held`: the prefetched batches of the train step, the train state during an evaluation), against the budget
`distributed.DEVICE_MEMORY_FRACTION` of the card (what train.py lets XLA claim; the rest is the CUDA context's).
"""
from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dcv2_jax import config as config_lib
from dcv2_jax import device_crops
from dcv2_jax.bench import baseline, gpu_targets, program_stats, run_programs
from dcv2_jax.bench.report import GIB, emit, images224
from dcv2_jax.data import prefetch
from dcv2_jax.evaluation import features, protocol
from dcv2_jax.model.trunk import TrunkArch, trunk_apply_fn
from dcv2_jax.run import distributed
from dcv2_jax.sharding import batch_sharded, replicated
from dcv2_jax.train_step import trunk_variables

PROGRAMS = ("supervised_step", "train_step", "device_crops", "bank_init_step", "kmeans_xla", "kmeans_pallas",
            "eval_forward")
# Batches on the device beside the one in the running step: the next step's (the trainer queues one step ahead,
# trainer.train_epoch), data.device_prefetch's queue, and the one its thread holds waiting for a free slot.
PREFETCHED_BATCHES = 1 + prefetch.QUEUED_BATCHES + 1
BATCH_QUANTUM = 8           # the planner's per-device batches are multiples of this


def config_for_devices(config, num_devices: int, per_device_batch: int = 0) -> tuple[ml_collections.ConfigDict, list]:
  """The config at `per_device_batch` per device (0: the config's own global batch split over the devices), and
  notes. BatchNorm groups of model.sync_bn.samples that cannot be met at that batch become one group per device
  (the grouping changes the statistics, not the memory or the compute)."""
  config = ml_collections.ConfigDict(config.to_dict())
  notes = []
  if per_device_batch > 0:
    config.batch_size, config.per_device_batch_size = per_device_batch * num_devices, 0
  samples, per_device = config.model.sync_bn.samples, config.batch_size // num_devices
  if samples and config_lib.sample_group_problems(samples, config.batch_size, num_devices):
    config.model.sync_bn.samples = per_device
    notes.append(f"model.sync_bn.samples {samples} -> {per_device} (one group per device at this batch)")
  return config, notes


def budget_bytes(gpu_name: str) -> float:
  """What a program may use of the card: the share of its memory train.py lets XLA claim."""
  return gpu_targets.GPUS[gpu_name].memory_bytes * distributed.DEVICE_MEMORY_FRACTION


def _per_device_bytes(tree, num_devices: int) -> int:
  """Bytes a device holds of abstract arrays: a sharded array's share, a replicated array whole."""
  total = 0
  for x in jax.tree.leaves(tree):
    n = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    total += n // num_devices if x.sharding.spec and any(x.sharding.spec) else n
  return total


# ------------------------------------------------------------------------------------------ the programs

def lower(name: str, programs: run_programs.RunPrograms):
  """(lowered program, 224 px images per device (None where no images are trained), bytes the trainer holds on
  each device beside the program) for one of PROGRAMS."""
  config, mesh = programs.config, programs.mesh
  n = mesh.devices.size
  per_device = config.batch_size // n
  if name == "supervised_step":
    init, step = baseline.supervised_step(50, 64, jnp.bfloat16)
    images = jax.ShapeDtypeStruct((2 * per_device * n, 224, 224, 3), jnp.float32, sharding=batch_sharded(mesh))
    labels = jax.ShapeDtypeStruct((2 * per_device * n,), jnp.int32, sharding=batch_sharded(mesh))
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)),
                         jax.eval_shape(init, jax.random.key(0), images))
    return jax.jit(step, donate_argnums=0).lower(state, images, labels), 2.0 * per_device, 0
  state = run_programs.abstract_state(programs)
  batch = run_programs.abstract_batch(programs)
  if name == "train_step":
    return (programs.steps.train.lower(state, batch), per_device * images224(config.data.crops),
            PREFETCHED_BATCHES * _per_device_bytes(batch, n))
  if name == "device_crops":                   # the part of the train step that cuts the crops (crops_on=device)
    cut = jax.jit(lambda batch: device_crops.cut(batch, programs.spec.crop_groups), out_shardings=batch_sharded(mesh))
    return cut.lower({k: batch[k] for k in ("image", "image_size", "boxes")}), None, 0
  if name == "bank_init_step":
    batch.pop("stop")                         # the bank's pass is not tagged for preemption (trainer.py)
    slot = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh))
    return programs.steps.bank_init.lower(state, batch, slot), None, PREFETCHED_BATCHES * _per_device_bytes(batch, n)
  if name in ("kmeans_xla", "kmeans_pallas"):
    # The Pallas kernel lowers only inside an abstract GPU mesh when no GPU is attached.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return programs.steps.kmeans.lower(state, run_programs.abstract_key(mesh)), None, 0
  if name == "eval_forward":
    size, _ = config_lib.eval_view(config.data)
    rows = -(-protocol.fast_protocol().extract_batch_size // n) * n
    sharded = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharded(mesh))
    forward = features.forward_program(trunk_apply_fn(TrunkArch.from_config(config.model)),
                                       *config_lib.normalization(config), mesh)
    return (forward.lower(trunk_variables(state), sharded((rows, size, size, 3), jnp.uint8),
                          sharded((rows,), jnp.int32), sharded((rows,), jnp.int32), sharded((rows,), jnp.bool_)),
            None, _per_device_bytes(state, n))
  raise ValueError(f"unknown program {name!r}; choose from {', '.join(PROGRAMS)}")


def compile_one(name: str, programs: run_programs.RunPrograms, gpu_name: str) -> dict:
  """Compiles one program for the mesh's GPUs: what it holds and needs (program_stats.read), its memory against
  the card's budget, and its FLOPs and bytes per 224 px image."""
  t0 = time.perf_counter()
  lowered, images, held = lower(name, programs)
  compiled = lowered.compile()
  stats = program_stats.read(compiled)
  budget = budget_bytes(gpu_name)
  mem = stats.pop("memory")
  peak = mem["total"] + held
  record = {"compiled": True, "compile_s": round(time.perf_counter() - t0, 1),
            "memory_gib": {k: round(v / GIB, 2) for k, v in dict(mem, held=held, peak=peak).items()},
            "budget_gib": round(budget / GIB, 1), "fits": bool(peak <= budget),
            "headroom_gib": round((budget - peak) / GIB, 2),
            "collectives": {k: {"count": v["count"], "mb": round(v["bytes"] / 2 ** 20, 1)}
                            for k, v in stats.pop("collectives").items()},
            **{k: stats[k] for k in ("cudnn_convolutions", "pallas_kernels", "triton_fusions", "rematerialized")},
            "gflops": round(stats["flops"] / 1e9, 1), "gbytes_accessed": round(stats["bytes_accessed"] / 1e9, 2)}
  if images:
    record["gflops_per_image224"] = round(stats["flops"] / images / 1e9, 2)
    record["mbytes_per_image224"] = round(stats["bytes_accessed"] / images / 1e6, 1)
  return record


@functools.lru_cache(maxsize=None)
def _mesh(gpu_name: str, num_devices: int):
  return gpu_targets.mesh(gpu_name, num_devices)


def programs_for(config, gpu_name: str, num_devices: int, num_examples: int, kmeans_assign: str | None = None):
  """RunPrograms of `config` (already at its per-device batch: config_for_devices) on num_devices of the GPU."""
  if kmeans_assign is not None:
    config = ml_collections.ConfigDict(config.to_dict())
    config.loss.kmeans_assign = kmeans_assign
  return run_programs.build(config, _mesh(gpu_name, num_devices), num_examples)


def check(config, config_name: str, gpu_name: str, num_devices: int, per_device_batch: int, num_examples: int,
          programs=PROGRAMS) -> list[dict]:
  """One record per program of `programs`, compiled for num_devices x gpu_name (see the module doc)."""
  config, notes = config_for_devices(config, num_devices, per_device_batch)
  crops_on = programs_for(config, gpu_name, num_devices, num_examples).config.data.crops_on   # as compiled
  common = {"bench": "compile", "gpu": gpu_name, "devices": num_devices, "config": config_name,
            "per_device_batch": config.batch_size // num_devices, "num_examples": num_examples,
            "dtype": config.model.dtype, "grad_reduce_dtype": config.model.grad_reduce_dtype, "crops_on": crops_on,
            **({"notes": notes} if notes else {})}
  out, supervised, step = [], None, None
  for name in [p for p in PROGRAMS if p in programs]:
    assign = name.split("_")[1] if name.startswith("kmeans_") else None

    def one():
      return compile_one(name, programs_for(config, gpu_name, num_devices, num_examples, assign), gpu_name)

    record = {**common, "program": name}
    if name == "device_crops" and crops_on != "device":
      record.update(compiled=None, skipped=f"data.crops_on={crops_on}: the host cuts the crops, no such program")
      out.append(record)
      continue
    try:
      record.update(one())
    except Exception as e:  # pylint: disable=broad-except  (one program that does not compile: say so, go on)
      record.update(compiled=False, error=f"{type(e).__name__}: {' '.join(str(e).split())[:400]}")
    compiled = record["compiled"]
    if compiled and name == "supervised_step":
      supervised = record
    elif compiled and name == "device_crops" and step is not None:
      # What cutting the crops on the GPU adds to the step (it is part of the train step's program).
      record["vs_train_step"] = {"flops": round(record["gflops"] / step["gflops"], 4),
                                 "bytes": round(record["gbytes_accessed"] / step["gbytes_accessed"], 4)}
    elif compiled and supervised is not None and "gflops_per_image224" in record:
      record["vs_supervised"] = {
          "flops": round(record["gflops_per_image224"] / supervised["gflops_per_image224"], 3),
          "bytes": round(record["mbytes_per_image224"] / supervised["mbytes_per_image224"], 3)}
    if compiled and name == "train_step":
      step = record
    out.append(record)
  return out


# ------------------------------------------------------------------------------------------ the planner

def train_step_peak(config, gpu_name: str, num_devices: int, per_device_batch: int, num_examples: int) -> dict:
  budget = budget_bytes(gpu_name)
  peak, remat = _train_step_peak(config.to_json(), gpu_name, num_devices, per_device_batch, num_examples)
  return {"batch": per_device_batch, "peak": peak, "fits": peak <= budget, "rematerialized": remat}


@functools.lru_cache(maxsize=None)
def _train_step_peak(config_json: str, gpu_name: str, num_devices: int, per_device_batch: int,
                     num_examples: int) -> tuple[int, int]:
  """(peak bytes per device, instructions rematerialized) of the train step. One compile per card, even for cards
  of one compute capability (H100, H200): XLA rematerializes a program that exceeds the card's memory, so the
  program, and its peak, depend on the card's size."""
  config, _ = config_for_devices(config_lib.from_saved(json.loads(config_json)), num_devices, per_device_batch)
  record = compile_one("train_step", programs_for(config, gpu_name, num_devices, num_examples), gpu_name)
  return int(record["memory_gib"]["peak"] * GIB), record["rematerialized"]


def _line_points(points) -> list[tuple[int, int]]:
  """The two (batch, peak) points to draw the memory line through: those that bracket the budget (the largest batch
  that fits, the smallest that does not); if none fits, the two smallest; if all fit, the two largest."""
  pairs = sorted((p["batch"], p["peak"], p["fits"]) for p in points)
  fit, miss = [q[:2] for q in pairs if q[2]], [q[:2] for q in pairs if not q[2]]
  if fit and miss:
    return [fit[-1], miss[0]]
  return miss[:2] if miss else fit[-2:]


def max_batch(config, config_name: str, gpu_name: str, num_devices: int, num_examples: int, start: int = 0,
              max_tries: int = 6) -> dict:
  """The largest per-device batch (a multiple of BATCH_QUANTUM) whose train step fits the card. A step's peak
  memory is close to affine in the batch (the state does not grow with it, the activations do): two compiles give
  a line, a compile at the batch where it meets the budget tests it, and each new point refits the line through
  the two that bracket the budget (up to max_tries more compiles), until the answer repeats."""
  budget = budget_bytes(gpu_name)
  # A global batch of more samples than the dataset holds is no run: the dataset caps the answer too.
  largest = num_examples // num_devices // BATCH_QUANTUM * BATCH_QUANTUM
  if largest < 2 * BATCH_QUANTUM:
    raise ValueError(f"{num_examples} samples over {num_devices} GPU(s): fewer than {2 * BATCH_QUANTUM} a GPU, too "
                     "few to plan a batch for")
  resolved, _ = config_lib.resolve(config, num_devices, "gpu")      # per_device_batch_size -> batch_size
  b0 = start or resolved.batch_size // num_devices
  b0 = min(max(BATCH_QUANTUM, b0 // BATCH_QUANTUM * BATCH_QUANTUM), largest // 2 // BATCH_QUANTUM * BATCH_QUANTUM)
  points = [train_step_peak(config, gpu_name, num_devices, b, num_examples) for b in (b0, 2 * b0)]
  best = max((p for p in points if p["fits"]), key=lambda p: p["batch"], default=None)
  quantum = lambda b: int(b) // BATCH_QUANTUM * BATCH_QUANTUM
  for _ in range(max_tries):
    (b1, m1), (b2, m2) = _line_points(points)
    per_sample = (m2 - m1) / (b2 - b1)
    if per_sample <= 0:                       # memory does not grow with the batch: only the dataset limits it
      guess = largest
    else:
      guess = min(largest, quantum((budget - (m1 - per_sample * b1)) / per_sample))
    if best is None:
      # Nothing fits yet: a line through two misses overshoots when memory grows faster than affine; scaling the
      # smallest miss down to the budget undershoots an affine one. The smaller of the two soon brackets.
      guess = min(guess, quantum(b1 * budget / m1))
    if guess < BATCH_QUANTUM or any(p["batch"] == guess for p in points) or (best and guess <= best["batch"]):
      break
    point = train_step_peak(config, gpu_name, num_devices, guess, num_examples)
    points.append(point)
    if point["fits"] and (best is None or point["batch"] > best["batch"]):
      best = point
  return {"bench": "compile", "program": "train_step", "plan": "max_batch", "gpu": gpu_name, "devices": num_devices,
          "config": config_name, "max_per_device_batch": best["batch"] if best else 0,
          "limited_by": "the dataset" if best and best["batch"] == largest else "memory",
          "peak_gib": round(best["peak"] / GIB, 2) if best else None, "budget_gib": round(budget / GIB, 1),
          "rematerialized": best["rematerialized"] if best else None,
          "mib_per_sample": round(per_sample / 2 ** 20, 2), "fixed_gib": round((m1 - per_sample * b1) / GIB, 2),
          "batches_tried": sorted(p["batch"] for p in points)}


def add_arguments(parser) -> None:
  parser.add_argument("--config", required=True, help="the run's config (configs/*.py, optionally file.py:arg)")
  parser.add_argument("--gpu", default="h100", help=f"comma-separated of {', '.join(gpu_targets.GPUS)}")
  parser.add_argument("--devices", default="8", help="comma-separated GPU counts (one host each)")
  parser.add_argument("--per_device_batch", type=int, default=0,
                      help="samples per GPU (default: the config's global batch over the devices)")
  parser.add_argument("--num_examples", type=int, default=0, help="training samples (default: known dataset sizes)")
  parser.add_argument("--programs", default=",".join(PROGRAMS), help=f"comma-separated of {', '.join(PROGRAMS)}")
  parser.add_argument("--max_batch", action="store_true",
                      help="the memory planner: the largest per-device batch whose train step fits each card")


def run(args) -> list[dict]:
  from dcv2_jax import cli  # pylint: disable=g-import-not-at-top
  gpus = [g for g in args.gpu.split(",") if g]
  unknown = [g for g in gpus if g not in gpu_targets.GPUS]
  programs = [p for p in args.programs.split(",") if p]
  if unknown or not gpus:
    raise cli.UsageError(f"--gpu: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(gpu_targets.GPUS)}")
  if any(p not in PROGRAMS for p in programs):
    raise cli.UsageError(f"--programs: choose from {', '.join(PROGRAMS)}")
  try:
    counts = [int(d) for d in args.devices.split(",") if d]
  except ValueError:
    counts = []
  if not counts or min(counts) < 1:
    raise cli.UsageError(f"--devices {args.devices}: give GPU counts >= 1, e.g. 1,8")
  try:
    gpu_targets.toolkit_versions()
  except ImportError as e:                      # no CUDA compiler here: one line saying what to install
    raise cli.UsageError(str(e)) from None
  config = config_lib.load_file(args.config)
  num_examples = run_programs.dataset_size(config, args.num_examples)
  out = []
  for gpu_name in gpus:
    for n in counts:
      if args.max_batch:
        try:
          out.append(emit(max_batch(config, args.config, gpu_name, n, num_examples, args.per_device_batch)))
        except ValueError as e:               # a dataset too small to plan for: one line, not a traceback
          raise cli.UsageError(str(e)) from None
      else:
        out += [emit(r) for r in check(config, args.config, gpu_name, n, args.per_device_batch, num_examples,
                                       programs)]
  return out
