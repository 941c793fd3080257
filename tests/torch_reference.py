"""What the torch parity tests share (test_export.py, test_load.py): real photographs, trunks drawn with numpy
and given trained BatchNorm statistics, our features and torchvision's for them.

Parity needs non-trivial BatchNorm: we perturb every BN scale/bias and run train-mode passes so the
running statistics are neither 0 nor 1 (a swapped mean/var or a missed transpose would then show).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import traverse_util

from dcv2_jax.config import base_config
from dcv2_jax.model.multi_crop import DCv2Model
from dcv2_jax.model.trunk import ResNet, TrunkArch


def assert_close(ours, ref, rtol):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape
  scale = np.abs(ref).max()
  assert scale > 1e-3, "degenerate features: the comparison would prove nothing"
  err = np.abs(ours - ref).max() / scale
  assert err <= rtol, f"max relative error {err:.2e} > {rtol:.0e}"


def config_for(depth, width=1, base_width=64, head_dims=(2048, 128)):
  c = base_config()
  c.model.depth, c.model.width, c.model.base_width, c.model.head_dims = depth, width, base_width, head_dims
  return c


@pytest.fixture(scope="module")
def photos():
  """sklearn's two sample photographs, short side 256, centre crop 224, ImageNet-normalised, NHWC."""
  from PIL import Image
  from sklearn.datasets import load_sample_images
  out = []
  for img in load_sample_images().images:
    h, w = img.shape[:2]
    im = Image.fromarray(img).resize((round(w * 256 / h), 256), Image.BILINEAR)
    x = np.asarray(im, np.float32) / 255.0
    top, left = (x.shape[0] - 224) // 2, (x.shape[1] - 224) // 2
    out.append(x[top:top + 224, left:left + 224])
  x = (np.stack(out) - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  return x.astype(np.float32)


def numpy_init(model, *args):
  """Variables of `model` drawn with numpy: flax's init of ResNet-50 takes ~15 s on 2 CPU cores."""
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, train=False))

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel" and len(leaf.shape) == 4:   # torchvision's kaiming_normal_(fan_out)
      return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:2] + leaf.shape[3:])), leaf.shape).astype(np.float32)
    if name == "kernel":
      return rng.uniform(-1, 1, leaf.shape).astype(np.float32) / np.sqrt(leaf.shape[0])
    return (np.ones if name in ("scale", "var") else np.zeros)(leaf.shape, np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def with_trained_bn(model, variables, shape, wrap=lambda x: x, passes=3, seed=0):
  """Perturb BN scale/bias, then update running stats with train-mode passes on random images."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(jax.device_get(variables["params"]))
  for k, v in flat.items():
    if k[-1] == "scale":
      flat[k] = v * rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
    elif k[-1] == "bias" and k[-2].startswith(("bn", "downsample_bn")):
      flat[k] = v + rng.normal(0, 0.2, v.shape).astype(np.float32)
  params = traverse_util.unflatten_dict(flat)
  stats = variables["batch_stats"]
  step = jax.jit(lambda p, s, x: model.apply({"params": p, "batch_stats": s}, x, train=True,
                                             mutable=["batch_stats"])[1]["batch_stats"])
  for i in range(passes):
    x = rng.normal(0.3 * i, 1.0 + 0.2 * i, shape).astype(np.float32)
    stats = step(params, stats, wrap(x))
  stats = jax.device_get(stats)
  means = [np.abs(v).mean() for k, v in traverse_util.flatten_dict(stats).items() if k[-1] == "mean"]
  vars_ = [np.abs(v - 1).mean() for k, v in traverse_util.flatten_dict(stats).items() if k[-1] == "var"]
  assert min(means) > 1e-4 and min(vars_) > 1e-4, "running statistics stayed trivial"
  return {"params": params, "batch_stats": stats}


@pytest.fixture(scope="module")
def rn18():
  """A ResNet-18 DCv2Model with a small BN head, trained BN statistics and 2 heads of 10 centroids."""
  model = DCv2Model(TrunkArch(18), head_dims=(64, 16))
  v = numpy_init(model, [jnp.zeros((2, 1, 32, 32, 3))])
  v = with_trained_bn(model, v, (4, 64, 64, 3), wrap=lambda x: [x[:, None]])  # crop groups [B, n, S, S, 3]
  centroids = np.random.default_rng(1).normal(size=(2, 10, 16)).astype(np.float32)
  return config_for(18, head_dims=(64, 16)), v, centroids


def trunk_of(v):
  return {"params": v["params"]["trunk"], "batch_stats": v["batch_stats"]["trunk"]}


def our_features(depth, variables, images, width=1, base_width=64):
  return np.asarray(ResNet(TrunkArch(depth, width, base_width)).apply(variables, images, train=False))


def torchvision_features(tv, images):
  tv.fc = torch.nn.Identity()
  tv.eval()
  with torch.no_grad():
    return tv(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()


def load_into_torchvision(arch, sd):
  tv = getattr(torchvision.models, arch)()
  sd = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v)) for k, v in sd.items()}
  result = tv.load_state_dict(sd, strict=False)
  assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
  assert result.unexpected_keys == []
  return tv
