"""`python -m dcv2_jax.bench recipe --config configs/X.py`: a recipe's train step at its own model, crops and global
batch: the FLOPs XLA counts, the time they would take on one H100 at the plain Flax ResNet-50 anchor's rate (a
lower bound: smaller images and networks use a GPU less well, and the input pipeline, k-means and evaluation are
not counted), with `--steps N` its time on this machine, and, where XLA's CUDA compiler is installed, its memory
(gpu_compile.py): at the recipe's batch on 8 GPUs, and the largest batch that fits one card of each --gpus.
"""
from __future__ import annotations

from dcv2_jax import config as config_lib
from dcv2_jax.bench import gpu_compile, gpu_targets, run_programs
from dcv2_jax.bench.report import H100_ANCHOR_IMG224_PER_S, emit, time_calls
from dcv2_jax.data import pipeline
from dcv2_jax.sharding import make_mesh

# An H100's achieved rate on a ResNet train step, for estimates from FLOPs: perf.md's plain Flax ResNet-50
# (report.H100_ANCHOR_IMG224_PER_S) at the 23.75 GFLOP XLA counts per image of that step (Lowered.cost_analysis,
# the same counter applied to the recipe's step): about 134 TFLOP/s.
XLA_GFLOP_PER_IMAGE_RN50 = 23.75


def estimate(config_path: str, num_examples: int, steps: int, warmup: int) -> dict:
  config = config_lib.load_file(config_path)
  num_examples = run_programs.dataset_size(config, num_examples)
  # The estimate is a GPU's: the step as a GPU run builds it, its crops cut where data.crops_on=auto puts them there.
  config.data.crops_on = pipeline.crops_on(config, "gpu")
  programs = run_programs.build(config, make_mesh(), num_examples)
  config, spe = programs.config, programs.spec.steps_per_epoch
  lowered = programs.steps.train.lower(run_programs.abstract_state(programs), run_programs.abstract_batch(programs))
  flops = float(lowered.cost_analysis()["flops"])
  step_s = flops / (H100_ANCHOR_IMG224_PER_S * XLA_GFLOP_PER_IMAGE_RN50 * 1e9)
  record = {"config": config_path, "epochs": config.num_epochs, "batch": config.batch_size,
            "crops": "+".join(f"{int(n)}x{int(s)}" for s, n, *_ in config.data.crops),
            "model": f"resnet{config.model.depth}" + ("-cifar" if config.model.stem == "cifar" else ""),
            "crops_on": config.data.crops_on, "num_examples": num_examples, "steps_per_epoch": spe,
            "train_gflop_per_step": round(flops / 1e9, 1),
            "h100_estimate_step_ms": round(step_s * 1e3, 2), "h100_estimate_epoch_s": round(step_s * spe, 1),
            "h100_estimate_run_h": round(step_s * spe * config.num_epochs / 3600, 2),
            "estimate_basis": "FLOPs at the plain Flax ResNet-50 anchor's 134 TFLOP/s (perf.md): a lower bound"}
  if steps > 0:
    train = lambda s, b: (lambda new, *out: (new, out))(*programs.steps.train(s, b))
    compile_s, ms = time_calls(train, run_programs.synthetic_state(programs), (run_programs.synthetic_batch(programs),),
                               steps, warmup)
    record.update(step_ms=round(ms, 2), compile_s=round(compile_s, 1),
                  run_h_here=round(ms / 1e3 * spe * config.num_epochs / 3600, 1))
  return record


def memory_plan(config_path: str, num_examples: int, gpus) -> dict:
  """The train step's peak memory per device at the recipe's global batch on 8 H100s, and the largest batch
  that fits one card of each of `gpus`."""
  try:
    gpu_targets.toolkit_versions()
  except ImportError as e:
    return {"memory": f"not planned: {e}"}
  config = config_lib.load_file(config_path)
  num_examples = run_programs.dataset_size(config, num_examples)
  (on_8,) = gpu_compile.check(config, config_path, "h100", 8, 0, num_examples, ("train_step",))
  plan = {"memory_8x_h100": {k: on_8.get(k) for k in ("per_device_batch", "memory_gib", "fits", "error") if k in on_8}}
  for gpu in gpus:
    best = gpu_compile.max_batch(config, config_path, gpu, 1, num_examples)
    plan[f"max_batch_1x_{gpu}"] = best["max_per_device_batch"]
  return plan


def add_arguments(parser) -> None:
  parser.add_argument("--config", required=True, help="the config file (configs/*.py, optionally file.py:arg)")
  parser.add_argument("--num_examples", type=int, default=0, help="training samples (default: known sizes)")
  parser.add_argument("--gpus", default=",".join(gpu_targets.GPUS),
                      help="cards for the memory plan (needs jax[cuda12-local]; '' = none)")


def run(args, argv) -> list[dict]:
  steps = args.steps if "--steps" in argv else 0
  record = {"bench": "recipe", **estimate(args.config, args.num_examples, steps, args.warmup)}
  gpus = [g for g in args.gpus.split(",") if g]
  if gpus:
    record.update(memory_plan(args.config, args.num_examples, gpus))
  return [emit(record)]

