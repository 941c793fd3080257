"""What the trainer tests share: a small, fast variant of the digits demo, and how to run train.py on it."""
import json
import os
import sys

import jax
import numpy as np

from configs import digits
from dcv2_jax.run.checkpoint import restore_model_variables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small, fast variant of the demo: 16px digits, one crop size, narrow ResNet-18, 22 steps an epoch.
# Heads of unequal numbers of clusters, as VISSL allows: every run below goes through the padded centroids.
OVERRIDES = {"data.image_size_digits": 16, "data.crops": ((16, 2, 0.4, 1.0),), "model.base_width": 8,
             "model.head_dims": (32, 16), "loss.num_clusters": (10, 6, 4), "num_epochs": 2,
             "checkpoint_every_steps": 5, "log_every_steps": 5, "eval_at_end": False, "keep_checkpoints": 20,
             # A gentle LR: runs that differ only in reduction order (devices, processes) then stay within
             # float tolerance of each other; at the demo's LR 4.8 such differences grow chaotically.
             "optim.lr": 0.3, "optim.warmup_start_lr": 0.03}


def small_config(**extra):
  c = digits.get_config()
  for key, value in {**OVERRIDES, **extra}.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def cli_args(workdir, **extra):
  args = [sys.executable, os.path.join(REPO, "train.py"), f"--config={REPO}/configs/digits.py", f"--workdir={workdir}"]
  for key, value in {**OVERRIDES, **extra}.items():
    args.append(f"--config.{key}={value}")
  return args


def env(devices):
  e = dict(os.environ)
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  e["JAX_PLATFORMS"] = "cpu"
  e["PYTHONPATH"] = REPO
  return e


def logged_step(metrics) -> int:
  """The highest step in a run's metrics.jsonl so far (a line still being written is skipped)."""
  steps = [0]
  for line in metrics.read_text().splitlines() if metrics.exists() else []:
    try:
      steps.append(json.loads(line).get("step", 0))
    except json.JSONDecodeError:
      pass
  return max(steps)


def assert_same_as_reference(workdir, reference_run):
  """A resumed run ends where the uninterrupted reference does: step 44, weights and centroids to 1e-6."""
  got, got_c, step = final_params(workdir)
  ref, ref_c, _ = final_params(reference_run)
  assert step == 44
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got_c, ref_c, rtol=1e-6, atol=1e-7)


def final_params(workdir):
  _, variables, centroids, step = restore_model_variables(workdir)
  return jax.tree.leaves(variables), centroids, step


