"""Colour augmentation of multi-crop batches: flip, colour jitter, grayscale, Gaussian blur, normalisation.

The CPU pipeline (dcv2_jax/data) decodes and cuts the random resized crops; everything that follows in the
DCv2 recipe (spec: "Augmentation") is here, written as batched array ops so it can run inside the jitted
train step on the accelerator (`augment.where == 'device'`, the default), and as a per-sample numpy version
for `augment.where == 'host'` (`host_augment`, called by the data pipeline).

Semantics follow torchvision's tensor (float) ops, with these documented choices:
  * The four jitter ops run in a random order per image, as torchvision's ColorJitter (`augment.jitter_order
    = 'random'`; 'fixed' = brightness -> contrast -> saturation -> hue, cheaper); each op clamps to [0, 1]
    as torchvision's do. Brightness/contrast/saturation factors are U(max(0, 1-j), 1+j), the hue shift
    U(-j, j), as in ColorJitter.
  * Grayscale uses torchvision's ITU-R 601-2 luma 0.2989 R + 0.587 G + 0.114 B, replicated to 3 channels.
  * Blur: a kernel of `blur_kernel_size` taps (default 23 at every size, as the released models), sigma
    U(blur_sigma), reflect-101 borders (torch's 'reflect' padding, OpenCV's default border, scipy's
    'mirror'), i.e. torchvision.transforms.v2.functional.gaussian_blur.
  * The flip is folded into the width blur matrix (flip then blur == blur with the matrix's columns
    reversed), so it costs no extra pass over the image.

Randomness: every crop's 13 uniforms (`NUM_UNIFORMS`) come from one PRNG key on the device, or from the
sample's numpy Generator on the host; `params_from_uniforms` turns them into operation parameters, the same
function on both paths, so both draw from the same distribution.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

WHERE = ("device", "host")             # augment.where: inside the jitted step | on CPU in the data pipeline
JITTER_ORDERS = ("random", "fixed")    # augment.jitter_order
# Luma weights of torchvision's rgb_to_grayscale (ITU-R 601-2).
LUMA = (0.2989, 0.587, 0.114)
# Uniform draws per crop, by position: flip, jitter on, brightness, contrast, saturation, hue, gray on,
# blur on, blur sigma, then 4 whose ranks give the jitter order (argsort of iid uniforms: a uniform
# permutation, as torch.randperm(4) in ColorJitter).
NUM_UNIFORMS = 13
# Mixed into the seed so augmentation keys never coincide with keys the trainer derives from the same seed.
_KEY_DOMAIN = 0x61756733


def _cfg(cfg: Any, name: str, default=None):
  """Reads a key from a ConfigDict, a dict or any attribute holder."""
  if isinstance(cfg, Mapping):
    return cfg.get(name, default)
  return getattr(cfg, name, default)


# ----------------------------------------------------------------------------------------------------------
# Randomness
# ----------------------------------------------------------------------------------------------------------

def crop_keys(seed, epoch, index, num_crops: int) -> jax.Array:
  """Per-crop PRNG keys [B, num_crops] that depend on (seed, epoch, dataset index, crop number) only.

  So a crop's colour randomness is the same whatever the batch layout, device count or process count.
  `epoch` and `index` may be traced; crop numbers run over all crop groups in config order
  (see `group_slices`).
  """
  base = jax.random.fold_in(jax.random.key(seed), _KEY_DOMAIN)
  base = jax.random.fold_in(base, jnp.asarray(epoch).astype(jnp.uint32))  # -1 (bank init) wraps
  crops = jnp.arange(num_crops, dtype=jnp.uint32)

  def per_sample(i):
    k = jax.random.fold_in(base, i)
    return jax.vmap(lambda c: jax.random.fold_in(k, c))(crops)

  # Bad samples carry index -1: it wraps to 2**32 - 1, a valid (if shared) key; their crops are zeros.
  return jax.vmap(per_sample)(jnp.asarray(index).astype(jnp.uint32))


def group_slices(crops) -> list[slice]:
  """The columns of `crop_keys(...)` that belong to each crop group of `data.crops`."""
  out, start = [], 0
  for _, count, *_ in crops:
    out.append(slice(start, start + int(count)))
    start += int(count)
  return out


def params_from_uniforms(u, cfg) -> dict:
  """Maps uniforms [..., NUM_UNIFORMS] in [0, 1) to operation parameters (numpy or jax arrays alike)."""
  bj, cj, sj, hj = (float(v) for v in _cfg(cfg, "jitter"))
  lo_sigma, hi_sigma = (float(v) for v in _cfg(cfg, "blur_sigma"))

  def factor(v, j):  # ColorJitter: U(max(0, 1 - j), 1 + j)
    lo = max(0.0, 1.0 - j)
    return lo + (1.0 + j - lo) * v

  return dict(
      flip=u[..., 0] < float(_cfg(cfg, "flip_p")),
      jitter=u[..., 1] < float(_cfg(cfg, "jitter_p")),
      brightness=factor(u[..., 2], bj),
      contrast=factor(u[..., 3], cj),
      saturation=factor(u[..., 4], sj),
      hue=hj * (2.0 * u[..., 5] - 1.0),
      gray=u[..., 6] < float(_cfg(cfg, "grayscale_p")),
      blur=u[..., 7] < float(_cfg(cfg, "blur_p")),
      sigma=lo_sigma + (hi_sigma - lo_sigma) * u[..., 8],
      order=u[..., 9:13].argsort(axis=-1).astype(np.int32),   # works on numpy and jax arrays alike
  )


def augment_params(keys, cfg) -> dict:
  """The parameters `device_augment` uses for each key: dict of [N] arrays (see `params_from_uniforms`)."""
  u = jax.vmap(lambda k: jax.random.uniform(k, (NUM_UNIFORMS,), jnp.float32))(keys)
  return params_from_uniforms(u, cfg)


# ----------------------------------------------------------------------------------------------------------
# Pixel ops shared by the device and host paths (xp = jax.numpy or numpy; channels as separate planes so that
# numpy works on contiguous memory and XLA sees one elementwise expression)
# ----------------------------------------------------------------------------------------------------------

def _luma(r, g, b):
  return LUMA[0] * r + LUMA[1] * g + LUMA[2] * b


def _fmod6(x, xp):
  # x mod 6 into [0, 6); np.mod on floats is ~50x slower than this.
  return x - 6.0 * xp.floor(x * (1.0 / 6.0))


def _brightness(xp, r, g, b, f):
  """Blend with black."""
  return tuple(xp.clip(c * f, 0.0, 1.0) for c in (r, g, b))


def _contrast(xp, r, g, b, f):
  """Blend with the mean of the grayscale image."""
  off = (1.0 - f) * xp.mean(_luma(r, g, b), axis=(-2, -1), keepdims=True)
  return tuple(xp.clip(c * f + off, 0.0, 1.0) for c in (r, g, b))


def _saturation(xp, r, g, b, f):
  """Blend with the grayscale image."""
  off = (1.0 - f) * _luma(r, g, b)
  return tuple(xp.clip(c * f + off, 0.0, 1.0) for c in (r, g, b))


def _hue(xp, r, g, b, shift):
  """Rotate H in HSV: torchvision's rgb->hsv->rgb with the hsv->rgb step in closed form,
  channel = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + 6H) mod 6, n = 5, 3, 1 (C = V - min = V * S)."""
  maxc = xp.maximum(xp.maximum(r, g), b)
  chroma = maxc - xp.minimum(xp.minimum(r, g), b)
  div = xp.where(chroma > 0, chroma, 1.0)
  h6 = xp.where(maxc == r, (g - b) / div,
                xp.where(maxc == g, 2.0 + (b - r) / div, 4.0 + (r - g) / div))
  h6 = h6 + 6.0 * shift  # any value; the mod below wraps it

  def channel(n):
    k = _fmod6(h6 + n, xp)
    return maxc - chroma * xp.clip(xp.minimum(k, 4.0 - k), 0.0, 1.0)

  return channel(5.0), channel(3.0), channel(1.0)


JITTER_OPS = (_brightness, _contrast, _saturation, _hue)   # the numbering of `order`


def jitter_planes(xp, r, g, b, brightness, contrast, saturation, hue, order=None):
  """ColorJitter on float planes in [0, 1], each op clamped.

  Factors broadcast against the planes ([N, 1, 1] for a batch, scalars for one image). order: None = fixed
  (brightness, contrast, saturation, hue); a length-4 sequence = that order (one image); an [N, 4] array =
  a per-image order, applied as 4 rounds that each compute the 4 ops and keep the drawn one (XLA fuses the
  rounds into a few elementwise passes).
  """
  factors = (brightness, contrast, saturation, hue)
  if order is None:
    order = range(4)
  if np.ndim(order) == 1:
    for k in order:
      r, g, b = JITTER_OPS[int(k)](xp, r, g, b, factors[int(k)])
    return r, g, b
  # Per-image order (jax only): round j applies every op, each with its neutral factor (1, 1, 1, 0: the
  # identity on [0, 1] images) except the op the image's order puts in slot j. The rounds are a fori_loop:
  # unrolled, the 16 ops (4 hue rotations) took XLA minutes to compile; looped, the body is the fixed
  # order's 4 ops. (A per-image select between the 4 candidate results miscompiled on XLA:CPU.)
  def round_(j, planes):
    slot = jax.lax.dynamic_index_in_dim(order, j, axis=1, keepdims=False)[:, None, None]
    for k, (op, f) in enumerate(zip(JITTER_OPS, factors)):
      planes = op(jnp, *planes, jnp.where(slot == k, f, 0.0 if k == 3 else 1.0))
    return planes

  return jax.lax.fori_loop(0, 4, round_, (r, g, b))


# ----------------------------------------------------------------------------------------------------------
# Blur as banded matrices
# ----------------------------------------------------------------------------------------------------------

def blur_kernel_size(size: int, cfg=None) -> int:
  """Odd tap count: augment.blur_kernel_size (default 23, the released models' OpenCV 23x23 kernel at every
  crop size; a 10%-of-size kernel would cut sigma=2 off at 2 sigma on 96px crops), or, when that is 0,
  blur_kernel_frac of the crop size. Capped below 2*size (reflect-101 needs radius < size)."""
  fixed = int(_cfg(cfg, "blur_kernel_size", 23) if cfg is not None else 23)
  if fixed > 0:
    k = fixed | 1
  else:
    frac = float(_cfg(cfg, "blur_kernel_frac", 0.1) if cfg is not None else 0.1)
    k = 2 * int(frac / 2 * size) + 1
  return max(1, min(k, 2 * size - 1))


def gaussian_taps(xp, sigma, ksize: int):
  """Normalised Gaussian taps [..., ksize] for sigmas [...] (torchvision's kernel)."""
  t = xp.arange(ksize, dtype=xp.float32) - (ksize - 1) / 2
  w = xp.exp(-0.5 * (t / sigma[..., None]) ** 2)
  return w / xp.sum(w, axis=-1, keepdims=True)


@functools.lru_cache(maxsize=None)
def _tap_matrices(size: int, ksize: int) -> np.ndarray:
  """Static [ksize, size, size] 0/1 matrices: P[t, i, j] = 1 iff output row i reads source row j at tap t.

  Reflect-101 borders are folded in here, so a blur is sum_t w_t P[t] with no padding.
  """
  r = ksize // 2
  src = np.arange(size)[:, None] + np.arange(-r, r + 1)[None, :]
  src = np.abs(src)                                          # reflect at 0: -1 -> 1
  src = np.where(src > size - 1, 2 * (size - 1) - src, src)  # reflect at size - 1
  p = np.zeros((ksize, size, size), np.float32)
  p[np.arange(ksize)[None, :], np.arange(size)[:, None], src] = 1.0
  return p


def blur_matrices(weights, size: int):
  """Per-image [N, S, S] blur matrices (out = M @ x along one axis) from taps [N, ksize]."""
  p = jnp.asarray(_tap_matrices(size, weights.shape[-1]))
  return jnp.einsum("nt,tij->nij", weights, p, precision=jax.lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------------------------------------
# Device path
# ----------------------------------------------------------------------------------------------------------

def _mean_std(cfg):
  mean = np.asarray(_cfg(cfg, "mean"), np.float32)
  std = np.asarray(_cfg(cfg, "std"), np.float32)
  return mean, std


def normalize(images, cfg, out_dtype=jnp.bfloat16):
  """uint8 [..., 3] -> (x / 255 - mean) / std in out_dtype (the only op when augment.where == 'host')."""
  mean, std = _mean_std(cfg)
  x = images.astype(jnp.float32)
  return (x * (1.0 / (255.0 * std)) - mean / std).astype(out_dtype)


def apply_params(images, params: dict, cfg, out_dtype=jnp.bfloat16):
  """Flip, jitter, grayscale, blur and normalise uint8 [N, S, S, 3] with explicit parameters ([N] arrays).

  `device_augment` = `augment_params` + this; tests call it with chosen parameters. An op whose
  probability in cfg is 0 is left out of the program (never drawn, so nothing changes but the cost: the
  linear evaluation's flip-only crops skip the jitter rounds and the blur matmuls).
  """
  size = images.shape[1]
  if images.shape[2] != size:
    raise ValueError(f"crops must be square, got {images.shape}")
  per_image = lambda v: jnp.asarray(v)[:, None, None]
  x = images.astype(jnp.float32) * (1.0 / 255.0)
  r, g, b = x[..., 0], x[..., 1], x[..., 2]

  # One elementwise pass (plus the contrast mean, a per-image reduction).
  if float(_cfg(cfg, "jitter_p", 0.8)) > 0:
    order = jnp.asarray(params["order"]) if _cfg(cfg, "jitter_order", "random") == "random" else None
    jr, jg, jb = jitter_planes(jnp, r, g, b, per_image(params["brightness"]), per_image(params["contrast"]),
                               per_image(params["saturation"]), per_image(params["hue"]), order)
    on = per_image(params["jitter"])
    r, g, b = jnp.where(on, jr, r), jnp.where(on, jg, g), jnp.where(on, jb, b)
  if float(_cfg(cfg, "grayscale_p", 0.2)) > 0:
    gray = per_image(params["gray"])
    y = _luma(r, g, b)
    r, g, b = jnp.where(gray, y, r), jnp.where(gray, y, g), jnp.where(gray, y, b)
  x = jnp.stack([r, g, b], axis=-1)
  mean, std = _mean_std(cfg)
  if float(_cfg(cfg, "blur_p", 0.5)) <= 0:
    x = jnp.where(jnp.asarray(params["flip"])[:, None, None, None], x[:, :, ::-1], x)
    return ((x - mean) * (1.0 / std)).astype(out_dtype)

  # Blur as two batched matmuls (tensor cores on GPU; a grouped conv was far slower, see perf.md). Images
  # not blurred get the identity (a one-hot centre tap); the flip is the width matrix's columns reversed.
  ksize = blur_kernel_size(size, cfg)
  taps = gaussian_taps(jnp, jnp.asarray(params["sigma"], jnp.float32), ksize)
  centre = jax.nn.one_hot(ksize // 2, ksize, dtype=jnp.float32)
  taps = jnp.where(jnp.asarray(params["blur"])[:, None], taps, centre)
  m_h = blur_matrices(taps, size)
  m_w = jnp.where(per_image(params["flip"]), m_h[:, :, ::-1], m_h)
  # f32 outputs get an exact f32 blur; 16-bit outputs let the backend use its fast matmul (TF32 on GPU),
  # whose error (~2^-11) is below the output's own rounding.
  prec = jax.lax.Precision.HIGHEST if jnp.dtype(out_dtype) == jnp.float32 else None
  x = jnp.einsum("nij,njwc->niwc", m_h, x, precision=prec)
  x = jnp.einsum("nkw,niwc->nikc", m_w, x, precision=prec)
  return ((x - mean) * (1.0 / std)).astype(out_dtype)


def device_augment(images, keys, cfg, out_dtype=jnp.bfloat16):
  """Colour augmentation of uint8 crops [N, S, S, 3] with per-crop keys [N] (from `crop_keys`).

  Returns [N, S, S, 3] normalised in out_dtype. Jittable; cfg values are static Python numbers.
  """
  return apply_params(images, augment_params(keys, cfg), cfg, out_dtype)


def augment_crops(crops, index, epoch, cfg, *, seed: int, out_dtype, crop_ids=None) -> list:
  """A batch's uint8 crop groups [B, n, S, S, 3] -> augmented, normalised groups in out_dtype (what the
  network sees). With augment.where == 'host' the colour ops already ran in the pipeline: normalise only.

  Each crop's randomness comes from (seed, epoch, dataset index, crop number) only, so the crops do not
  depend on the device, worker or process count. crop_ids: the crop numbers of each group's columns
  (default: the groups' crops in order, 0, 1, ...).
  """
  if crop_ids is None:
    counts = [x.shape[1] for x in crops]
    crop_ids = [tuple(range(sum(counts[:g]), sum(counts[:g + 1]))) for g in range(len(crops))]
  keys = crop_keys(seed, epoch, index, max(max(ids) for ids in crop_ids) + 1)     # [B, C]
  out = []
  for x, ids in zip(crops, crop_ids):
    b, n = x.shape[:2]
    flat = x.reshape((b * n,) + x.shape[2:])
    if _cfg(cfg, "where") == "device":
      y = device_augment(flat, keys[:, jnp.asarray(ids)].reshape(b * n), cfg, out_dtype)
    else:
      y = normalize(flat, cfg, out_dtype)
    out.append(y.reshape(x.shape))
  return out


# ----------------------------------------------------------------------------------------------------------
# Host path (numpy, one sample's crops of one size at a time)
# ----------------------------------------------------------------------------------------------------------

def host_augment(crops: np.ndarray, uniforms: np.ndarray, cfg) -> np.ndarray:
  """The device ops on CPU for uint8 crops [n, S, S, 3] with uniforms [n, NUM_UNIFORMS]; returns uint8.

  Output stays uint8 (rounded), so the train step only normalises. The blur uses scipy's correlate1d in
  'mirror' mode (= reflect-101) with the same taps: no BLAS threads to fight the data workers for cores.
  """
  # Late: only the host path (augment.where='host', in the grain workers) needs scipy.
  from scipy import ndimage  # pylint: disable=g-import-not-at-top

  p = params_from_uniforms(np.asarray(uniforms, np.float32), cfg)
  size = crops.shape[1]
  ksize = blur_kernel_size(size, cfg)
  out = np.empty_like(crops)
  for i in range(crops.shape[0]):
    # Planar float32: contiguous per-channel planes make the numpy ops several times faster.
    x = crops[i].transpose(2, 0, 1).astype(np.float32) * np.float32(1 / 255)
    if p["flip"][i]:
      x = x[:, :, ::-1]
    r, g, b = x
    if p["jitter"][i]:
      f = lambda name: np.float32(p[name][i])
      order = p["order"][i] if _cfg(cfg, "jitter_order", "random") == "random" else None
      r, g, b = jitter_planes(np, r, g, b, f("brightness"), f("contrast"), f("saturation"), f("hue"), order)
    if p["gray"][i]:
      r = g = b = _luma(r, g, b)
    x = np.stack([r, g, b]).astype(np.float32, copy=False)
    if p["blur"][i]:
      w = gaussian_taps(np, np.asarray([p["sigma"][i]], np.float32), ksize)[0].astype(np.float32)
      # Outer taps below 1e-7 change no output by more than 3e-6 (uint8 steps are 4e-3): drop them, which
      # halves the work at the average sigma. The kernel stays centred (symmetric trim).
      keep = int(np.sum(w[: ksize // 2] < 1e-7))
      w = w[keep: ksize - keep]
      x = ndimage.correlate1d(x, w, axis=1, mode="mirror")
      x = ndimage.correlate1d(x, w, axis=2, mode="mirror")
    out[i] = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)
  return out
