"""`python -m dcv2_jax.bench grad_sum`: what summing the devices' gradients in bfloat16 costs in accuracy, against
float32 (model.grad_reduce_dtype; weight_grads.py says why it exists). Runs on the CPU.

Per-device gradients of the real DCv2 loss: the digits demo's network (ResNet-18 at a quarter width, bfloat16
compute) at initialisation, on 8 digits a device, each device's gradient rounded to bfloat16 as a GPU's bfloat16 backward
convolution returns it. They are summed three ways and compared with their exact (float64) sum, per tensor:
  float32     each device's gradient converted to float32, summed in float32 (PyTorch DDP under AMP; ours);
  bf16_ring   NCCL's ring all-reduce in bfloat16: the partial sum rounded to bfloat16 at every hop;
  bf16_tree   a tree all-reduce in bfloat16: rounded at every level.
Prints per device count the relative error ||sum - exact|| / ||exact|| (median and max over the tensors, and
over all of them).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dcv2_jax import loss
from dcv2_jax.bench.report import emit
from dcv2_jax.config import base_config
from dcv2_jax.conventions import l2_normalize
from dcv2_jax.data import sources
from dcv2_jax.model.multi_crop import dcv2_model

SAMPLES_PER_DEVICE = 8


def per_device_gradients(num_devices: int, seed: int = 0) -> list[np.ndarray]:
  """[num_devices, size] float32 per parameter tensor: each device's gradient of the DCv2 loss, bfloat16-rounded."""
  config = base_config()           # the digits demo's network (configs/digits.py) in bfloat16
  config.model.depth, config.model.base_width, config.model.head_dims = 18, 16, (256, 64)
  config.model.dtype, config.loss.num_clusters = "bfloat16", (40, 40, 40)
  model = dcv2_model(config, bn_groups=1)
  source = sources.DigitsSource("train", 32)
  rng = np.random.default_rng(seed)
  rows = rng.choice(len(source), num_devices * SAMPLES_PER_DEVICE, replace=False)
  images = np.stack([source[int(i)]["image"] for i in rows]).astype(np.float32) / 255.0
  x = (images - 0.45) / 0.225
  crops = jnp.asarray(np.stack([x, x[:, :, ::-1]], axis=1))              # two views a sample: [N, 2, S, S, 3]
  variables = model.init(jax.random.key(seed), [crops[:2]], train=True)
  heads, k, dim = len(config.loss.num_clusters), config.loss.num_clusters[0], config.model.head_dims[-1]
  centroids = l2_normalize(jax.random.normal(jax.random.key(seed + 1), (heads, k, dim)))
  targets = jax.random.randint(jax.random.key(seed + 2), (heads, len(rows)), 0, k)

  def gradient(device_crops, device_targets):
    def loss_of(params):
      z, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, [device_crops], train=True,
                         mutable=["batch_stats"])
      return loss.dcv2_loss(jnp.swapaxes(z, 0, 1), centroids, device_targets, config.loss.temperature)
    return jax.grad(loss_of)(variables["params"])

  grads = jax.jit(jax.vmap(gradient, in_axes=(0, 1)))(
      crops.reshape((num_devices, SAMPLES_PER_DEVICE) + crops.shape[1:]),
      targets.reshape(heads, num_devices, SAMPLES_PER_DEVICE))
  return [_bf16(np.asarray(g, np.float32).reshape(num_devices, -1)) for g in jax.tree.leaves(grads)]


def _bf16(x):
  return x.astype(ml_dtypes.bfloat16).astype(np.float32)


def sums(g: np.ndarray) -> dict[str, np.ndarray]:
  """The sum over axis 0 of per-device gradients g [devices, size], the three ways of the module doc."""
  ring = g[0]
  for row in g[1:]:
    ring = _bf16(ring + row)
  tree = g
  while tree.shape[0] > 1:
    if tree.shape[0] % 2:
      tree = np.concatenate([tree, np.zeros_like(tree[:1])])
    tree = _bf16(tree[0::2] + tree[1::2])
  return {"float32": g.sum(0, dtype=np.float32), "bf16_ring": ring, "bf16_tree": tree[0]}


def relative_errors(grads: list[np.ndarray]) -> dict:
  per_tensor, squared, norm2 = {}, {}, 0.0
  for g in grads:
    exact = g.astype(np.float64).sum(0)
    norm = np.linalg.norm(exact)
    if norm == 0:
      continue
    norm2 += norm ** 2
    for way, total in sums(g).items():
      err = np.linalg.norm(total - exact)
      per_tensor.setdefault(way, []).append(err / norm)
      squared[way] = squared.get(way, 0.0) + err ** 2
  return {way: {"median": float(np.median(e)), "max": float(np.max(e)), "all": float(np.sqrt(squared[way] / norm2))}
          for way, e in per_tensor.items()}


def add_arguments(parser) -> None:
  parser.add_argument("--devices", default="8,64", help="comma-separated device counts")


def run(args) -> list[dict]:
  counts = [2] if args.quick else [int(n) for n in args.devices.split(",") if n]
  out = []
  for n in counts:
    errors = relative_errors(per_device_gradients(n))
    out.append(emit({"bench": "grad_sum", "devices": n, "samples_per_device": SAMPLES_PER_DEVICE,
                     "relative_error": {way: {k: float(f"{v:.3g}") for k, v in e.items()} for way, e in errors.items()}}))
  return out
