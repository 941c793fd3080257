"""Step 2 on the accelerator (`data.crops_on=device`): the random resized crops cut from the decoded images inside
the jitted step, so the CPU only decodes.

The host draws every crop box exactly as in host mode (data/transforms.py: `crop_boxes`, a function of (seed,
epoch, dataset index) alone) and sends each image on a fixed-size canvas (its true height and width beside it)
with its boxes. Here each crop is a bilinear resize of its box to S x S with antialiasing: torchvision's
RandomResizedCrop on a PIL image, which is what the host path runs (PIL's `resize(box=...)`): output pixel o of a
box [start, start + length) samples the input at start + (o + 0.5) * length / S; the triangle filter is widened by
length / S when the box shrinks (antialias); input pixels outside the image (the canvas's padding) have weight 0
and the weights are normalised, as PIL clamps to the image. The resize is separable: per crop a [S, H] and a
[S, W] weight matrix, applied as two batched matmuls (tensor cores).

Parity with the host path (PIL rounds to uint8 between its two passes and at the end; this does not):
tests/test_device_crops.py holds the crops within 0.25 levels on average and 2 at most.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def resize_weights(start, length, out_size: int, in_size, canvas: int):
  """[..., out_size, canvas] weights of the antialiased bilinear resize of [start, start + length) (arrays [...])
  to out_size pixels, over input pixels 0..canvas-1 of which the first in_size ([...]) are the image's."""
  start, length, in_size = (jnp.asarray(v, jnp.float32)[..., None, None] for v in (start, length, in_size))
  scale = length / out_size                                     # input pixels per output pixel
  support = jnp.maximum(scale, 1.0)                             # the triangle's half-width, widened to antialias
  centre = start + (jnp.arange(out_size, dtype=jnp.float32)[:, None] + 0.5) * scale      # [out, 1], edge coords
  pixel = jnp.arange(canvas, dtype=jnp.float32)[None, :] + 0.5                           # [1, canvas] centres
  w = jnp.maximum(0.0, 1.0 - jnp.abs(pixel - centre) / support) * (pixel < in_size)
  return w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-12)


def resized_crops(image, image_size, boxes, out_size: int):
  """Crops [B, n, S, S, 3] float32 (values in [0, 255]) of images [B, H, W, 3] (uint8 canvases whose top-left
  image_size [B, 2] = (height, width) pixels are the image) at boxes [B, n, 4] = (top, left, height, width)."""
  height, width = image.shape[1:3]
  wy = resize_weights(boxes[..., 0], boxes[..., 2], out_size, image_size[:, None, 0], height)    # [B, n, S, H]
  wx = resize_weights(boxes[..., 1], boxes[..., 3], out_size, image_size[:, None, 1], width)     # [B, n, S, W]
  # HIGHEST: full float32 products. A GPU's default for float32 matmuls is TF32 (10-bit mantissa), which would err
  # by up to ~0.1 of a grey level on bright pixels; the host's PIL crops are exact to the uint8 rounding.
  hi = jax.lax.Precision.HIGHEST
  rows = jnp.einsum("bnsh,bhwc->bnswc", wy, image.astype(jnp.float32), precision=hi)
  return jnp.einsum("bntw,bnswc->bnstc", wx, rows, precision=hi)


def crops_of(batch: dict, groups) -> list:
  """The crop groups of a training batch, [B, n_g, S_g, S_g, 3] for each (size, count) of `groups`: cut here from
  a device-crop batch (data.crops_on=device), as the host cut them otherwise."""
  return cut(batch, groups) if "image" in batch else batch["crops"]


def cut(batch: dict, groups) -> list:
  """The crop groups the step trains on, [B, n_g, S_g, S_g, 3] for each (size, count) of `groups`, from a
  device-crop batch (image, image_size, boxes; the boxes in the order of the groups' crops)."""
  out, first = [], 0
  for size, count in groups:
    out.append(resized_crops(batch["image"], batch["image_size"], batch["boxes"][:, first:first + count], size))
    first += count
  return out


def cut_one(batch: dict, crop: int, size: int):
  """Crop number `crop` alone, [B, 1, S, S, 3] (the memory bank's pass forwards each crop on its own)."""
  return resized_crops(batch["image"], batch["image_size"], batch["boxes"][:, crop:crop + 1], size)
