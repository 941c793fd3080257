"""The GPU compile check (test_bench_gpu_compile.py) for the multi-crop recipe and the other gradient-reduction
choice."""
import pytest

from dcv2_jax import bench
from dcv2_jax import config as config_lib
from dcv2_jax.bench import gpu_compile

pytestmark = pytest.mark.gpu_compile


def test_the_compute_dtype_choice_sums_in_bfloat16():
  """model.grad_reduce_dtype=compute gives XLA's choice back: the weight gradients go over the devices in bfloat16
  (half the bytes), so the float32 assertion of test_bench_gpu_compile.py is one that can fail."""
  config = config_lib.load_file("configs/dcv2_2crops.py")
  config.model.grad_reduce_dtype = "compute"
  (step,) = gpu_compile.check(config, "configs/dcv2_2crops.py", "h100", 8, 64, 1_281_167, ("train_step",))
  assert step["compiled"] and step["collectives"]["all-reduce bfloat16"]["mb"] > 40


def test_multi_crop_step_compiles_and_fits_on_8_gpus():
  (step,) = bench.main(["compile", "--config", "configs/dcv2_2x160_4x96.py", "--gpu", "h100", "--devices", "8",
                        "--per_device_batch", "64", "--programs", "train_step"])
  assert step["compiled"] and step["fits"], step.get("error")
  assert not any(k.startswith("all-reduce bfloat16") for k in step["collectives"])
