"""The benchmark command at tiny sizes on CPU: it runs and prints the figures it promises."""
import json

import pytest

from dcv2_jax import bench
from dcv2_jax.bench import kmeans as kmeans_bench
from dcv2_jax.bench import recipe


def test_step_bench_prints_figures(capsys):
  results = bench.main(["step", "--quick", "--crops", "2x160+4x96"])
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  assert [r["bench"] for r in lines] == ["supervised_step", "dcv2_step"] and len(results) == 2
  dcv2 = lines[1]
  for key in ("step_ms", "img_per_s", "img224_per_s", "samples_per_s", "compile_s", "vs_supervised_img224",
              "device"):
    assert key in dcv2
  assert dcv2["step_ms"] > 0 and dcv2["samples_per_s"] > 0
  # 6 crops per sample: images/s = 6 x samples/s
  assert abs(dcv2["img_per_s"] / dcv2["samples_per_s"] - 6) < 0.05


def test_kmeans_bench_prints_figures(capsys):
  bench.main(["kmeans", "--quick", "--kmeans_dtypes", "float32"])
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  assert sorted((r["assign"], r["sums"]) for r in lines) == [("pallas", "onehot"), ("pallas", "scatter"),
                                                             ("xla", "onehot"), ("xla", "scatter")]
  line = lines[0]
  assert line["bench"] == "kmeans" and line["heads"] == 3 and line["seconds"] > 0 and line["rows"] == 4096


def test_augment_bench_prints_figures(capsys):
  bench.main(["augment", "--quick", "--jitter_orders", "random,fixed"])
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  assert [(r["crops"], r["size"], r["jitter_order"]) for r in lines] == [
      (16, 32, "random"), (16, 32, "fixed"), (48, 16, "random"), (48, 16, "fixed")]
  for r in lines:
    assert r["ms"] > 0
    # the per-512@224 figure scales the time by crop count and pixel count
    assert abs(r["ms_per_512_at_224"] - r["ms"] * 512 / r["crops"] * (224 / r["size"]) ** 2) < 0.01 * r["ms_per_512_at_224"]


def test_assign_bench_compares_kernel_with_xla(capsys):
  bench.main(["assign", "--quick", "--kmeans_dtypes", "float32"])
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  assert [r["method"] for r in lines] == ["xla", "pallas 16x32 w4 s2"]
  assert all(r["ms"] > 0 for r in lines) and lines[1]["agree_with_xla"] == 1.0 and "agree_with_xla" not in lines[0]


def test_a_failing_case_is_reported_and_the_rest_still_run(capsys, monkeypatch):
  """A case that fails (here the fused kernel, as a compiler could reject it) prints an error line; the next runs."""
  real = kmeans_bench.cluster_all_heads

  def rejects_the_kernel(*args):
    if args[-1] == "pallas":
      raise ValueError("the compiler rejected the kernel")
    return real(*args)

  monkeypatch.setattr(kmeans_bench, "cluster_all_heads", rejects_the_kernel)
  bench.main(["kmeans", "--quick", "--kmeans_dtypes", "float32", "--kmeans_sums", "scatter",
              "--kmeans_assign", "pallas,xla"])
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  assert [r["assign"] for r in lines] == ["pallas", "xla"]
  assert "ValueError" in lines[0]["error"] and "seconds" not in lines[0]
  assert lines[1]["seconds"] > 0 and "error" not in lines[1]


def test_bad_input_is_one_line_before_anything_runs(capsys):
  for argv, part in ((["step", "--crops", "2x224,bogus"], "--crops: unknown bogus"),
                     (["kmeans", "--kmeans_dtypes", "float64"], "--kmeans_dtypes: unknown float64"),
                     (["assign", "--blocks", "128x128"], "--blocks: 128x128 is not"),
                     (["step", "--batch", "0"], "--batch must be > 0")):
    with pytest.raises(SystemExit, match=part):
      bench.main(argv)
  assert capsys.readouterr().out == ""        # no case ran


def test_recipe_bench_counts_the_step_flops_and_estimates_the_run(capsys):
  """bench recipe on the demo's config: XLA's FLOP count of its train step and the H100 estimate derived from it."""
  (r,) = bench.main(["recipe", "--config", "configs/digits.py", "--gpus", ""])
  assert r["batch"] == 64 and r["crops"] == "2x32" and r["steps_per_epoch"] == 1438 // 64
  # ResNet-18 at quarter width on 64 x 2 crops of 32 px: forward ~0.0035 GFLOP a crop, x3 for training.
  assert 0.5 < r["train_gflop_per_step"] < 3
  rate = recipe.H100_ANCHOR_IMG_PER_S * recipe.XLA_GFLOP_PER_IMAGE_RN50
  assert abs(r["h100_estimate_step_ms"] - r["train_gflop_per_step"] / rate * 1e3) < 0.01
  assert '"bench": "recipe"' in capsys.readouterr().out


def test_grad_sum_bench_shows_bfloat16_sums_lose_what_float32_sums_keep(capsys):
  """The measurement behind model.grad_reduce_dtype=float32: the devices' gradients of the real DCv2 loss summed in
  float32 are exact to float32 rounding; summed in bfloat16 (ring or tree) they are off by a fraction of a percent."""
  (r,) = bench.main(["grad_sum", "--devices", "8"])
  err = r["relative_error"]
  assert err["float32"]["max"] < 1e-6
  for way in ("bf16_ring", "bf16_tree"):
    assert 1e-4 < err[way]["all"] < 0.05 and err[way]["median"] > 1e3 * err["float32"]["max"]
  assert '"bench": "grad_sum"' in capsys.readouterr().out
