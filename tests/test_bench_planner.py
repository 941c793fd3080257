"""The memory planner's search (gpu_compile.max_batch) on a model of a step's peak memory instead of XLA's CUDA
compiler: the affine fit, the confirming compile, a miss that refits, the dataset's cap, and batches it refuses.
test_bench_gpu_compile*.py compile the real step (CI's third leg)."""
import pytest

from dcv2_jax import config as config_lib
from dcv2_jax.bench import gpu_compile, gpu_targets
from dcv2_jax.run import distributed

GIB = 2 ** 30
BUDGET = gpu_targets.GPUS["h100"].memory_bytes * distributed.DEVICE_MEMORY_FRACTION


def fake_peaks(monkeypatch, peak_of_batch):
  """Replaces the compile: peak bytes = peak_of_batch(batch); records the batches asked for."""
  asked = []

  def peak(config, gpu_name, num_devices, batch, num_examples):
    asked.append(batch)
    p = peak_of_batch(batch)
    return {"batch": batch, "peak": p, "fits": p <= BUDGET, "rematerialized": 0}

  monkeypatch.setattr(gpu_compile, "train_step_peak", peak)
  return asked


def plan(num_examples=1_281_167, devices=8, **overrides):
  c = config_lib.load_file("configs/dcv2_2crops.py")
  for k, v in overrides.items():
    c[k] = v
  return gpu_compile.max_batch(c, "configs/dcv2_2crops.py", "h100", devices, num_examples)


def test_an_affine_peak_is_found_in_three_compiles(monkeypatch):
  asked = fake_peaks(monkeypatch, lambda b: 3 * GIB + b * 80 * 2 ** 20)          # 80 MiB a sample
  r = plan()
  want = int((BUDGET - 3 * GIB) / (80 * 2 ** 20)) // 8 * 8
  assert r["max_per_device_batch"] == want and r["limited_by"] == "memory"
  assert asked == [512, 1024, want]                 # the recipe's 4096 over 8 GPUs, twice that, the answer
  assert r["mib_per_sample"] == 80 and r["fixed_gib"] == 3


def largest_that_fits(peak) -> int:
  return max(b for b in range(8, 20_000, 8) if peak(b) <= BUDGET)


# Memory that grows faster than the line through two points (a strong quadratic term): the line misleads.
CONVEX = lambda b: 2 * GIB + b * 60 * 2 ** 20 + (b / 256) ** 2 * GIB


def test_a_convex_peak_misses_then_refits_to_the_largest_batch_that_fits(monkeypatch):
  # Both first points fit; the line through them overshoots, that guess misses; the line between the fit and the
  # miss then finds the answer.
  asked = fake_peaks(monkeypatch, CONVEX)
  r = plan(per_device_batch_size=128)
  assert asked[:2] == [128, 256] and CONVEX(asked[2]) > BUDGET
  assert r["max_per_device_batch"] == largest_that_fits(CONVEX) and r["limited_by"] == "memory"


def test_both_first_batches_too_large_still_find_a_batch_that_fits(monkeypatch):
  # One GPU starts at the recipe's whole batch (4096, then 8192): neither fits, and a line through two misses
  # overshoots a convex peak; scaling the smaller miss down to the budget brackets it.
  asked = fake_peaks(monkeypatch, CONVEX)
  r = plan(devices=1)
  assert asked[:2] == [4096, 8192]
  assert CONVEX(r["max_per_device_batch"]) <= BUDGET
  assert r["max_per_device_batch"] >= largest_that_fits(CONVEX) - 2 * 8       # within two quanta of the answer


def test_the_dataset_caps_the_batch_and_a_flat_peak_is_no_division_by_zero(monkeypatch):
  fake_peaks(monkeypatch, lambda b: 5 * GIB)                                       # no growth with the batch
  r = plan(num_examples=5_000, devices=1, batch_size=256)
  assert r["max_per_device_batch"] == 5_000 // 8 * 8 and r["limited_by"] == "the dataset"


def test_per_device_batch_size_is_where_the_search_starts(monkeypatch):
  asked = fake_peaks(monkeypatch, lambda b: 3 * GIB + b * 80 * 2 ** 20)
  plan(per_device_batch_size=100)
  assert asked[:2] == [96, 192]                     # 100 rounded down to a multiple of 8


def test_too_few_samples_a_gpu_is_refused(monkeypatch):
  fake_peaks(monkeypatch, lambda b: GIB)
  with pytest.raises(ValueError, match="fewer than 16 a GPU"):
    plan(num_examples=100, devices=8)
