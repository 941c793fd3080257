"""The run's programs compiled by XLA's CUDA compiler for H100s, on a machine without a GPU (bench/gpu_compile.py).
test_bench_gpu_compile_choices.py holds the other recipes and settings (a second file: CI's two workers compile both at
once).

Needs XLA's CUDA compiler (pip install -e ".[gpu-compile]"): CI's third leg runs these files (-m gpu_compile) on
every commit; the other legs leave it out (pyproject's addopts). Each program compiles for 1 and 8 H100s, fits
the card, sums the weight gradients over the devices in float32, and does the work of a plain Flax ResNet-50
step per 224 px image; k-means runs the fused Pallas kernel without gathering the bank.
"""
import pytest

from dcv2_jax import bench

pytestmark = pytest.mark.gpu_compile
RECIPE = "configs/dcv2_2crops.py"


def compiled(records, program, devices):
  (record,) = [r for r in records if r["program"] == program and r["devices"] == devices]
  assert record["compiled"], record.get("error")
  return record


@pytest.fixture(scope="module")
def two_crops():
  """The 2x224 recipe at the published 64 per GPU, through the command itself."""
  return bench.main(["compile", "--config", RECIPE, "--gpu", "h100", "--devices", "1,8", "--per_device_batch", "64",
                     "--programs", "supervised_step,train_step,kmeans_pallas"])


@pytest.mark.parametrize("devices", [1, 8])
def test_train_step_compiles_fits_and_does_a_supervised_steps_work(two_crops, devices):
  step, supervised = compiled(two_crops, "train_step", devices), compiled(two_crops, "supervised_step", devices)
  assert step["fits"] and step["memory_gib"]["peak"] < 80 * 0.9
  assert step["rematerialized"] == 0              # far from the card's memory: XLA recomputes nothing to fit
  # data.crops_on=auto on GPUs: the step cuts the crops from 512 px canvases; four such batches wait beside it.
  assert step["crops_on"] == "device"
  assert abs(step["memory_gib"]["held"] - 4 * 64 * 512 * 512 * 3 / 2 ** 30) < 0.01
  # ResNet-50's 53 convolutions forward, backward to the weights and to the inputs (but the stem's: the images
  # need no gradient).
  assert step["cudnn_convolutions"] == 3 * 53 - 1
  # Two 224 px crops a sample: the FLOPs of two supervised images, within 5% (augmentation, head, loss, LARC).
  assert abs(step["vs_supervised"]["flops"] - 1) < 0.05, step["vs_supervised"]
  assert 24 < step["gflops_per_image224"] < 26


def test_weight_gradients_are_summed_over_the_gpus_in_float32(two_crops):
  """model.grad_reduce_dtype=float32 (the default): every gradient all-reduce is float32 (XLA alone would sum the
  2x224 step's weight gradients in bfloat16, as it does the supervised step's)."""
  step = compiled(two_crops, "train_step", 8)
  reduced = step["collectives"]
  assert reduced["all-reduce float32"]["mb"] > 4 * 25          # ResNet-50's 25.6M weights + the head, float32
  assert not any(k.startswith("all-reduce bfloat16") or k.startswith("all-reduce float16") for k in reduced)
  assert compiled(two_crops, "supervised_step", 8)["collectives"]["all-reduce bfloat16"]["mb"] > 40


@pytest.mark.parametrize("devices", [1, 8])
def test_kmeans_runs_the_fused_kernel_without_gathering_the_bank(two_crops, devices):
  kmeans = compiled(two_crops, "kmeans_pallas", devices)
  assert kmeans["fits"] and kmeans["pallas_kernels"] >= 3           # one kernel per head at least
  bank_mb_per_device = 1_281_167 * 128 * 4 * 2 / devices / 2 ** 20
  gathered = sum(v["mb"] for k, v in kmeans["collectives"].items() if k.startswith("all-gather"))
  assert gathered < 0.05 * bank_mb_per_device
