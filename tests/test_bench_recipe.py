"""bench recipe on the demo's config: the train step's FLOPs and the H100 estimate derived from them."""
from dcv2_jax import bench
from dcv2_jax.bench import recipe


def test_recipe_bench_counts_the_step_flops_and_estimates_the_run(capsys):
  """bench recipe on the demo's config: XLA's FLOP count of its train step and the H100 estimate derived from it."""
  (r,) = bench.main(["recipe", "--config", "configs/digits.py", "--gpus", ""])
  assert r["batch"] == 64 and r["crops"] == "2x32" and r["steps_per_epoch"] == 1438 // 64
  # ResNet-18 at quarter width on 64 x 2 crops of 32 px: forward ~0.0035 GFLOP a crop, x3 for training.
  assert 0.5 < r["train_gflop_per_step"] < 3
  rate = recipe.H100_ANCHOR_IMG224_PER_S * recipe.XLA_GFLOP_PER_IMAGE_RN50
  assert abs(r["h100_estimate_step_ms"] - r["train_gflop_per_step"] / rate * 1e3) < 0.01
  assert '"bench": "recipe"' in capsys.readouterr().out
