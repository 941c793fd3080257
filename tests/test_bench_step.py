"""bench step at tiny size on CPU: it runs and prints the figures it promises."""
import json

from dcv2_jax import bench


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


def test_step_bench_times_host_and_device_crops_side_by_side(capsys):
  """--crops_on host,device: the same step fed uint8 crops, then images and boxes (the step cuts the crops), one
  line each in the same run."""
  results = bench.main(["step", "--quick", "--crops", "2x224", "--crops_on", "host,device"])
  steps = [r for r in results if r["bench"] == "dcv2_step"]
  assert [r["crops_on"] for r in steps] == ["host", "device"]
  assert all(r["step_ms"] > 0 and "error" not in r for r in steps)
