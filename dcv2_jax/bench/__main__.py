"""python -m dcv2_jax.bench WHAT [flags]: see dcv2_jax/bench/__init__.py for what each benchmark measures.

  python -m dcv2_jax.bench step --crops 2x224            # --quick: tiny sizes, a CPU smoke run
  python -m dcv2_jax.bench compile --config configs/dcv2_2crops.py --gpu h100 --devices 8
  python -m dcv2_jax.bench all                            # the GPU check, most important first
"""
from __future__ import annotations

import argparse
import os
import sys

# `all`, in priority order (every line is printed as soon as it is measured, so a run cut short by a time limit
# still reports what it reached): the fused k-means kernel, the 2x224 step next to the supervised step (crops cut
# on the host and on the device), the augmentation alone, the XLA k-means variants, the multi-crop steps, the
# cheaper jitter order.
ALL = (["assign"],
       ["kmeans", "--kmeans_assign", "pallas", "--kmeans_sums", "scatter"],
       ["step", "--crops", "2x224", "--crops_on", "host,device"],
       ["augment", "--jitter_orders", "random,fixed"],
       ["kmeans", "--kmeans_assign", "xla", "--kmeans_dtypes", "float32"],
       ["kmeans", "--kmeans_assign", "xla", "--kmeans_dtypes", "bfloat16", "--kmeans_sums", "scatter"],
       ["step", "--crops", "2x160+4x96,2x224+6x96", "--crops_on", "host,device"],
       ["step", "--crops", "2x224", "--jitter_orders", "fixed"])
COMMANDS = ("step", "kmeans", "assign", "augment", "pipeline", "recipe", "compile", "grad_sum", "all")


def _choose_platform(what: str) -> None:
  """Compiling for GPUs this machine lacks needs JAX on the CPU: with the CUDA plugin installed and no GPU, jax
  would otherwise fail to start CUDA and then refuse the GPU topology. Before jax starts."""
  if what in ("compile", "recipe") and "JAX_PLATFORMS" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["JAX_PLATFORMS"] = "cpu"


def parser() -> argparse.ArgumentParser:
  from dcv2_jax.bench import augment, gpu_compile, grad_sum, kmeans, recipe, step  # pylint: disable=g-import-not-at-top
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke run")
  common.add_argument("--dtype", default="bfloat16", help="compute dtype of the timed programs")
  common.add_argument("--steps", type=int, default=20, help="timed calls")
  common.add_argument("--warmup", type=int, default=5, help="untimed calls after the compile")
  from dcv2_jax import bench  # pylint: disable=g-import-not-at-top
  top = argparse.ArgumentParser(prog="python -m dcv2_jax.bench", description=bench.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = top.add_subparsers(dest="what", required=True)
  step.add_arguments(sub.add_parser("step", parents=[common], help="the DCv2 train step vs the supervised step"))
  kmeans.add_arguments(sub.add_parser("kmeans", parents=[common], help="k-means of all heads"), "kmeans")
  kmeans.add_arguments(sub.add_parser("assign", parents=[common], help="one nearest-centroid pass"), "assign")
  augment.add_arguments(sub.add_parser("augment", parents=[common], help="the on-device colour augmentation"))
  recipe.add_arguments(sub.add_parser("recipe", parents=[common], help="a recipe's FLOPs, time and memory"))
  gpu_compile.add_arguments(sub.add_parser("compile", parents=[common], help="compile for GPUs without one"))
  grad_sum.add_arguments(sub.add_parser("grad_sum", parents=[common], help="bf16 vs f32 gradient sums"))
  sub.add_parser("all", parents=[common], help="the GPU check, most important first")
  sub.add_parser("pipeline", add_help=False, help="the CPU input pipeline (its own flags: pipeline --help)")
  return top


def _check(args) -> None:
  """Every listed choice and count known good before anything runs: a typo is one line, not a traceback."""
  from dcv2_jax import cli  # pylint: disable=g-import-not-at-top
  from dcv2_jax.bench import augment, kmeans, step  # pylint: disable=g-import-not-at-top
  from dcv2_jax.conventions import DTYPES  # pylint: disable=g-import-not-at-top
  lists = {"step": step.check_arguments, "augment": augment.check_arguments, "kmeans": kmeans.check_arguments,
           "assign": kmeans.check_arguments}.get(args.what, lambda a: {})(args)
  for flag, (given, allowed) in lists.items():
    unknown = [v for v in given.split(",") if v and v not in allowed]
    if unknown:
      raise cli.UsageError(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
  if args.dtype not in DTYPES:
    raise cli.UsageError(f"--dtype {args.dtype}: choose one of {', '.join(DTYPES)}")
  for flag in ("batch", "baseline_batch", "steps", "kmeans_rows", "chunk"):
    if getattr(args, flag, 1) <= 0:
      raise cli.UsageError(f"--{flag} must be > 0")


def main(argv=None) -> list[dict]:
  argv = list(sys.argv[1:] if argv is None else argv)
  _choose_platform(argv[0] if argv else "")
  from dcv2_jax import cli  # pylint: disable=g-import-not-at-top

  @cli.one_line_errors
  def run(argv) -> list[dict]:
    if argv and argv[0] == "pipeline":
      from dcv2_jax.bench import pipeline  # pylint: disable=g-import-not-at-top
      return pipeline.main(argv[1:])
    args = parser().parse_args(argv)
    _check(args)
    if args.what == "all":
      return [r for case in ALL for r in run(case + argv[1:])]
    from dcv2_jax.bench import augment, gpu_compile, grad_sum, kmeans, recipe, step  # pylint: disable=g-import-not-at-top
    return {"step": step.run, "kmeans": kmeans.run_kmeans, "assign": kmeans.run_assign, "augment": augment.run,
            "grad_sum": grad_sum.run, "recipe": lambda a: recipe.run(a, argv),
            "compile": gpu_compile.run}[args.what](args)

  return run(argv)


if __name__ == "__main__":
  main()
