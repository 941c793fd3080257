"""The GPU compile check (test_bench_gpu_compile.py) for the multi-crop recipe and the other gradient-reduction
choice."""
import pytest

from dcv2_jax import bench
from dcv2_jax import config as config_lib
from dcv2_jax.bench import gpu_compile

pytestmark = pytest.mark.gpu_compile


def test_the_compute_dtype_choice_sums_in_bfloat16_and_host_crops_compile():
  """model.grad_reduce_dtype=compute gives XLA's choice back: the weight gradients go over the devices in bfloat16
  (half the bytes), so the float32 assertion of test_bench_gpu_compile.py is one that can fail. With the crops cut
  on the host (data.crops_on=host) the step takes crops (four such batches wait on the device beside the step's),
  and there is no device_crops program to compile."""
  config = config_lib.load_file("configs/dcv2_2crops.py")
  config.model.grad_reduce_dtype, config.data.crops_on = "compute", "host"
  step, crops = gpu_compile.check(config, "configs/dcv2_2crops.py", "h100", 8, 64, 1_281_167,
                                  ("train_step", "device_crops"))
  assert step["compiled"] and step["collectives"]["all-reduce bfloat16"]["mb"] > 40
  assert step["crops_on"] == "host"
  assert abs(step["memory_gib"]["held"] - 4 * 64 * 2 * 224 * 224 * 3 / 2 ** 30) < 0.01
  assert crops["compiled"] is None and "host cuts the crops" in crops["skipped"]


def test_multi_crop_step_compiles_and_fits_on_8_gpus():
  (step,) = bench.main(["compile", "--config", "configs/dcv2_2x160_4x96.py", "--gpu", "h100", "--devices", "8",
                        "--per_device_batch", "64", "--programs", "train_step"])
  assert step["compiled"] and step["fits"], step.get("error")
  assert not any(k.startswith("all-reduce bfloat16") for k in step["collectives"])
