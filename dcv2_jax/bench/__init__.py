"""Benchmarks and checks that print one JSON line per result (with the machine it came from): `python -m
dcv2_jax.bench WHAT`, one module a benchmark.

  step       step.py         the DCv2 train step (RN50 bf16; 2x224, 2x160+4x96, 2x224+6x96) next to a plain Flax
                             supervised ResNet-50 step (baseline.py) measured in the same run
  kmeans     kmeans.py       k-means of all heads at ImageNet scale (XLA and the fused Pallas assignment)
  assign     kmeans.py       one nearest-centroid pass: XLA vs the fused kernel's block configurations
  augment    augment.py      the on-device colour augmentation alone
  pipeline   pipeline.py     the CPU input pipeline, samples/s per core
  recipe     recipe.py       a recipe's step FLOPs, an H100 estimate of its run, its memory per card
  compile    gpu_compile.py  a run's programs compiled for A100 / H100 / H200 without a GPU: compiles? fits?
                             collectives and their dtype, FLOPs and bytes per image; --max_batch plans batches
  grad_sum   grad_sum.py     bfloat16 vs float32 sums of the devices' gradients (accuracy)
  all        __main__.py     the GPU check: the cases that matter, most important first

Kept import-light: the command (__main__.py) decides the JAX platform before jax starts.
"""

# The published recipes' crops (configs/dcv2_*.py: data.crops): what the step, pipeline and recipe benchmarks run.
RECIPE_CROPS = {"2x224": ((224, 2, 0.08, 1.0),), "2x160+4x96": ((160, 2, 0.08, 1.0), (96, 4, 0.05, 0.14)),
                "2x224+6x96": ((224, 2, 0.14, 1.0), (96, 6, 0.05, 0.14))}


def main(argv=None) -> list[dict]:
  """The command, callable: main(['step', '--quick']) returns the records it printed."""
  from dcv2_jax.bench.__main__ import main as command  # pylint: disable=g-import-not-at-top
  return command(argv)
