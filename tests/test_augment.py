"""Colour augmentation (dcv2_jax/augment.py) against independent references: torchvision's tensor ops,
scipy's Gaussian filter, the luma and normalisation formulas, and the configured probabilities."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from dcv2_jax import augment, config

CFG = config.base_config().augment
MEAN = np.asarray(CFG.mean, np.float32)
STD = np.asarray(CFG.std, np.float32)
# jitted once per shape: much faster than op-by-op dispatch
apply_f32 = jax.jit(lambda x, q: augment.apply_params(x, q, CFG, jnp.float32))


def smooth_images(n, size, seed=0):
  """Natural-ish uint8 images (smooth colour fields plus texture), so blur and hue have something to do."""
  rng = np.random.default_rng(seed)
  coarse = rng.random((n, 4, 4, 3))
  big = np.asarray(jax.image.resize(coarse, (n, size, size, 3), "linear"))
  x = 255 * big + rng.normal(0, 20, (n, size, size, 3))
  return np.clip(x, 0, 255).astype(np.uint8)


def params(n, **kw):
  """Explicit parameters: everything off unless given."""
  p = dict(flip=np.zeros(n, bool), jitter=np.zeros(n, bool), brightness=np.ones(n, np.float32),
           contrast=np.ones(n, np.float32), saturation=np.ones(n, np.float32), hue=np.zeros(n, np.float32),
           gray=np.zeros(n, bool), blur=np.zeros(n, bool), sigma=np.ones(n, np.float32),
           order=np.tile(np.arange(4, dtype=np.int32), (n, 1)))
  p.update({k: np.asarray(v) for k, v in kw.items()})
  return p


def denorm(y):
  return np.asarray(y, np.float32) * STD + MEAN


def torchvision_reference(img_u8, p, i, ksize):
  """The spec's per-crop chain with torchvision's functional tensor ops, one image."""
  import torch
  from torchvision.transforms.v2 import functional as F
  x = torch.from_numpy(img_u8).permute(2, 0, 1).float() / 255.0
  if p["flip"][i]:
    x = F.horizontal_flip(x)
  if p["jitter"][i]:
    ops = [lambda t: F.adjust_brightness(t, float(p["brightness"][i])),
           lambda t: F.adjust_contrast(t, float(p["contrast"][i])),
           lambda t: F.adjust_saturation(t, float(p["saturation"][i])),
           lambda t: F.adjust_hue(t, float(p["hue"][i]))]
    for k in p["order"][i]:        # ColorJitter's random order (fn_idx)
      x = ops[int(k)](x)
  if p["gray"][i]:
    x = F.rgb_to_grayscale(x, num_output_channels=3)
  if p["blur"][i]:
    x = F.gaussian_blur(x, kernel_size=[ksize, ksize], sigma=[float(p["sigma"][i])] * 2)
  x = F.normalize(x, mean=list(CFG.mean), std=list(CFG.std))
  return x.permute(1, 2, 0).numpy()


def test_blur_kernel_size():
  # Default: 23 taps at every size (the released models' OpenCV kernel), capped below 2 x size.
  assert [augment.blur_kernel_size(s, CFG) for s in (224, 160, 96, 32, 8)] == [23, 23, 23, 23, 15]
  frac = config.base_config().augment
  frac.blur_kernel_size = 0
  assert [augment.blur_kernel_size(s, frac) for s in (224, 160, 96, 64, 32)] == [23, 17, 9, 7, 3]


@pytest.mark.torch
def test_each_op_matches_torchvision():
  size = 40
  imgs = smooth_images(8, size)
  p = params(
      8,
      flip=[1, 0, 0, 0, 0, 1, 0, 1],
      jitter=[0, 1, 1, 1, 0, 0, 1, 1],
      brightness=[1, 1.7, 0.3, 1, 1, 1, 1.2, 0.9],
      contrast=[1, 1, 1.8, 0.2, 1, 1, 0.6, 1.4],
      saturation=[1, 1, 1, 1.8, 1, 1, 0.2, 1.1],
      hue=[0, 0.19, -0.2, 0.05, 0, 0, -0.1, 0.13],
      gray=[0, 0, 0, 0, 1, 0, 1, 0],
      blur=[0, 0, 0, 0, 0, 1, 1, 1],
      sigma=[1, 1, 1, 1, 1, 0.1, 2.0, 1.3],
  )
  ksize = augment.blur_kernel_size(size, CFG)
  got = np.asarray(apply_f32(imgs, p))
  for i in range(8):
    want = torchvision_reference(imgs[i], p, i, ksize)
    np.testing.assert_allclose(got[i], want, atol=2e-4, err_msg=f"image {i}")


@pytest.mark.torch
def test_device_augment_matches_torchvision_with_its_own_draws():
  size = 32
  imgs = smooth_images(16, size, seed=1)
  keys = augment.crop_keys(3, jnp.int32(5), jnp.arange(16, dtype=jnp.int32), 1)[:, 0]
  got = np.asarray(jax.jit(lambda x, k: augment.device_augment(x, k, CFG, jnp.float32))(imgs, keys))
  p = {k: np.asarray(v) for k, v in augment.augment_params(keys, CFG).items()}
  for i in range(16):
    np.testing.assert_allclose(got[i], torchvision_reference(imgs[i], p, i, augment.blur_kernel_size(size, CFG)),
                               atol=2e-4)


def test_bfloat16_output_close_to_float32():
  imgs = smooth_images(4, 32, seed=2)
  keys = augment.crop_keys(0, 0, jnp.arange(4), 1)[:, 0]
  f32 = jax.jit(lambda x, k: augment.device_augment(x, k, CFG, jnp.float32))(imgs, keys)
  b16 = jax.jit(lambda x, k: augment.device_augment(x, k, CFG))(imgs, keys)
  assert b16.dtype == jnp.bfloat16 and b16.shape == (4, 32, 32, 3)
  np.testing.assert_allclose(np.asarray(b16, np.float32), np.asarray(f32), atol=0.02, rtol=0.01)


def test_blur_matches_scipy_gaussian_filter():
  """Separable blur with reflect-101 borders == scipy.ndimage.gaussian_filter1d(mode='mirror')."""
  size = 24
  imgs = smooth_images(3, size, seed=3)
  sigma = np.asarray([0.5, 1.0, 2.0], np.float32)
  p = params(3, blur=[1, 1, 1], sigma=sigma)
  got = denorm(apply_f32(imgs, p))
  radius = augment.blur_kernel_size(size, CFG) // 2  # 11 at 24 px
  for i in range(3):
    x = imgs[i].astype(np.float64) / 255
    ref = ndimage.gaussian_filter1d(x, float(sigma[i]), axis=0, mode="mirror", radius=radius)
    ref = ndimage.gaussian_filter1d(ref, float(sigma[i]), axis=1, mode="mirror", radius=radius)
    np.testing.assert_allclose(got[i], ref, atol=2e-5)


def test_flip_is_mirror_and_commutes_with_blur():
  imgs = smooth_images(2, 16, seed=4)
  plain = denorm(apply_f32(imgs, params(2)))
  np.testing.assert_allclose(plain, imgs / 255.0, atol=2e-6)  # all ops off: identity
  flipped = denorm(apply_f32(imgs, params(2, flip=[1, 1])))
  np.testing.assert_allclose(flipped, imgs[:, :, ::-1] / 255.0, atol=2e-6)
  both = denorm(apply_f32(imgs, params(2, flip=[1, 1], blur=[1, 1], sigma=[1.5, 1.5])))
  blur_of_flipped = denorm(apply_f32(np.ascontiguousarray(imgs[:, :, ::-1]), params(2, blur=[1, 1], sigma=[1.5, 1.5])))
  np.testing.assert_allclose(both, blur_of_flipped, atol=2e-6)


def test_grayscale_uses_itu601_luma():
  imgs = smooth_images(2, 8, seed=5)
  got = denorm(apply_f32(imgs, params(2, gray=[1, 0])))
  x = imgs.astype(np.float64) / 255
  luma = 0.2989 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
  for c in range(3):
    np.testing.assert_allclose(got[0, ..., c], luma[0], atol=2e-6)
  np.testing.assert_allclose(got[1], x[1], atol=2e-6)


def test_normalize():
  imgs = smooth_images(2, 8, seed=6)
  y = augment.normalize(imgs, CFG, jnp.float32)
  np.testing.assert_allclose(np.asarray(y), (imgs / 255.0 - np.asarray(CFG.mean)) / np.asarray(CFG.std), atol=1e-5)
  assert augment.normalize(imgs, CFG).dtype == jnp.bfloat16


def test_crop_keys_depend_only_on_seed_epoch_index_crop():
  f = jax.jit(augment.crop_keys, static_argnums=(0, 3))
  data = lambda k: np.asarray(jax.random.key_data(k))
  a = f(0, jnp.int32(2), jnp.asarray([5, 9, -1], jnp.int32), 4)
  b = f(0, jnp.int32(2), jnp.asarray([9, 5], jnp.int32), 4)  # other batch position, other batch size
  assert a.shape == (3, 4)
  np.testing.assert_array_equal(data(a[0]), data(b[1]))
  np.testing.assert_array_equal(data(a[1]), data(b[0]))
  flat = data(a).reshape(12, -1)
  assert len({tuple(r) for r in flat}) == 12  # crops and samples differ
  other_epoch = f(0, jnp.int32(3), jnp.asarray([5], jnp.int32), 4)
  other_seed = f(1, jnp.int32(2), jnp.asarray([5], jnp.int32), 4)
  assert not np.array_equal(data(other_epoch[0]), data(a[0]))
  assert not np.array_equal(data(other_seed[0]), data(a[0]))
  assert augment.group_slices(((224, 2, .14, 1), (96, 6, .05, .14))) == [slice(0, 2), slice(2, 8)]


def test_augment_param_statistics():
  n_idx, n_crops = 5000, 4
  keys = augment.crop_keys(0, 0, jnp.arange(n_idx), n_crops).reshape(-1)
  p = {k: np.asarray(v) for k, v in jax.jit(lambda k: augment.augment_params(k, CFG))(keys).items()}
  n = n_idx * n_crops
  tol = lambda q: 5 * np.sqrt(q * (1 - q) / n)  # 5 binomial standard deviations
  for name, prob in (("flip", CFG.flip_p), ("jitter", CFG.jitter_p), ("gray", CFG.grayscale_p),
                     ("blur", CFG.blur_p)):
    assert abs(p[name].mean() - prob) < tol(prob), (name, p[name].mean())
  for name in ("brightness", "contrast", "saturation"):
    assert 0.2 <= p[name].min() < 0.21 and 1.79 < p[name].max() <= 1.8, name
    assert abs(np.median(p[name]) - 1.0) < 0.03, name
  assert -0.2 <= p["hue"].min() < -0.195 and 0.195 < p["hue"].max() <= 0.2
  assert 0.1 <= p["sigma"].min() < 0.11 and 1.99 < p["sigma"].max() <= 2.0
  # independent decisions: P(flip and gray) = P(flip) P(gray)
  both = (p["flip"] & p["gray"]).mean()
  assert abs(both - CFG.flip_p * CFG.grayscale_p) < tol(0.1)


def test_host_augment_matches_device_ops():
  """host mode (numpy, uint8 out) = device ops on the same uniforms, up to the uint8 rounding."""
  rng = np.random.default_rng(7)
  imgs = smooth_images(12, 32, seed=7)
  u = rng.random((12, augment.NUM_UNIFORMS)).astype(np.float32)
  u[:4, 1] = 0.0  # make sure jitter, gray, blur and flip all occur
  u[4:6, 6] = 0.0
  u[6:9, 7] = 0.0
  host = augment.host_augment(imgs, u, CFG)
  assert host.dtype == np.uint8 and host.shape == imgs.shape
  device = denorm(apply_f32(imgs, augment.params_from_uniforms(u, CFG)))
  np.testing.assert_allclose(host / 255.0, device, atol=0.5 / 255 + 1e-5)


@pytest.mark.torch
def test_jitter_in_random_orders_matches_torchvision():
  size, n = 24, 8
  imgs = smooth_images(n, size, seed=7)
  rng = np.random.default_rng(7)
  p = params(n, jitter=np.ones(n, bool), brightness=rng.uniform(0.2, 1.8, n), contrast=rng.uniform(0.2, 1.8, n),
             saturation=rng.uniform(0.2, 1.8, n), hue=rng.uniform(-0.2, 0.2, n),
             order=np.stack([rng.permutation(4) for _ in range(n)]).astype(np.int32))
  got = np.asarray(apply_f32(imgs, p))
  for i in range(n):
    np.testing.assert_allclose(got[i], torchvision_reference(imgs[i], p, i, 3), atol=2e-4, err_msg=f"image {i}")
  # The order matters (else this test could not tell): the fixed order gives other images.
  fixed = dict(p, order=np.tile(np.arange(4, dtype=np.int32), (n, 1)))
  assert np.abs(np.asarray(apply_f32(imgs, fixed)) - got).max() > 0.05


def test_jitter_order_is_a_uniform_permutation():
  keys = augment.crop_keys(0, 0, jnp.arange(6000), 1)[:, 0]
  order = np.asarray(augment.augment_params(keys, CFG)["order"])
  assert np.all(np.sort(order, axis=1) == np.arange(4))
  first = np.bincount(order[:, 0], minlength=4) / len(order)
  np.testing.assert_allclose(first, 0.25, atol=0.03)
  perms = {tuple(o) for o in order}
  assert len(perms) == 24


def test_ops_with_probability_zero_are_left_out_without_changing_the_result():
  """jitter/gray/blur at p = 0 take the short path (no jitter rounds, no blur matmuls): the same pixels as
  the full path with those ops drawn off, in float32."""
  cfg = config.base_config().augment
  cfg.jitter_p, cfg.grayscale_p, cfg.blur_p = 0.0, 0.0, 0.0
  x = jnp.asarray(np.random.default_rng(3).integers(0, 256, (32, 12, 12, 3), dtype=np.uint8))
  keys = jax.random.split(jax.random.key(4), 32)
  q = augment.augment_params(keys, cfg)
  assert not np.any(np.asarray(q["jitter"]) | np.asarray(q["gray"]) | np.asarray(q["blur"]))
  short = jax.jit(lambda x, q: augment.apply_params(x, q, cfg, jnp.float32))
  np.testing.assert_allclose(np.asarray(short(x, q)), np.asarray(apply_f32(x, q)), atol=1e-5)
  hlo = short.lower(x, q).as_text()
  assert "dot_general" not in hlo and "while" not in hlo      # no blur matmul, no jitter rounds
  assert np.asarray(q["flip"]).any() and not np.asarray(q["flip"]).all()
