"""Per-sample CPU work: multi-crop RandomResizedCrop for training, resize + centre crop for evaluation.

Everything random here draws from `sample_rng(seed, epoch, index)`, so a sample's crops depend on nothing
but (seed, epoch, dataset index): not on worker count, process count or batch position.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

RATIO = (3.0 / 4.0, 4.0 / 3.0)
# How evaluation sees an image of size S: torchvision's Resize(S * 256 / 224) + CenterCrop(S) (the ImageNet
# protocol), or the whole image resized to S x S (CIFAR-style: a centre crop would keep 87.5% of a small image).
EVAL_VIEWS = ("center_crop", "whole")


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, index])))


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int, scale: Sequence[float],
                            ratio: Sequence[float] = RATIO) -> tuple[int, int, int, int]:
  """(top, left, h, w) as torchvision's RandomResizedCrop.get_params draws it.

  Area fraction U(scale), aspect ratio log-uniform in `ratio`, 10 tries; then a centre crop of the whole
  image clamped to the ratio range.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(img: Image.Image, box: tuple[int, int, int, int], size: int) -> np.ndarray:
  """Bilinear resize of the box to size x size. PIL's box argument crops and resizes in one pass (the
  filter may read a pixel beyond the box edge, where torchvision's crop-then-resize clamps)."""
  top, left, h, w = box
  return np.asarray(img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h)))


def crop_boxes(rng: np.random.Generator, height: int, width: int, crops: Sequence[Sequence[float]]) -> np.ndarray:
  """[C, 4] float32 (top, left, h, w) of every crop of the groups (size, count, min_scale, max_scale), in order:
  what both the host crops (multi_crop) and the device crops (device_crops.py) cut."""
  return np.asarray([random_resized_crop_box(rng, height, width, (lo, hi))
                     for _, count, lo, hi in crops for _ in range(int(count))], np.float32).reshape(-1, 4)


def multi_crop(image: np.ndarray, rng: np.random.Generator, crops: Sequence[Sequence[float]]) -> list:
  """One uint8 array [count, size, size, 3] per crop group (size, count, min_scale, max_scale)."""
  img = Image.fromarray(image)
  boxes = iter(crop_boxes(rng, image.shape[0], image.shape[1], crops).astype(int))
  return [np.stack([resized_crop(img, tuple(next(boxes)), int(size)) for _ in range(int(count))])
          for size, count, *_ in crops]


def fit_canvas(image: np.ndarray, canvas: int) -> tuple[np.ndarray, float, float]:
  """(image, height factor, width factor): the image as is when it fits a canvas x canvas square, else downscaled
  to fit (aspect kept; bilinear with antialias, as the host crops resize) with the factors its boxes scale by."""
  height, width = image.shape[:2]
  if height <= canvas and width <= canvas:
    return image, 1.0, 1.0
  scale = canvas / max(height, width)
  new_h, new_w = min(canvas, max(1, round(height * scale))), min(canvas, max(1, round(width * scale)))
  return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR)), new_h / height, new_w / width


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision Resize(round(size * 256 / 224)) + CenterCrop(size), bilinear: the evaluation transform."""
  short = int(round(size * 256 / 224))
  height, width = image.shape[:2]
  # torchvision: the short side becomes `short`, the long side int(short * long / short_in).
  if width <= height:
    new_w, new_h = short, int(short * height / width)
  else:
    new_w, new_h = int(short * width / height), short
  img = Image.fromarray(image)
  if (new_w, new_h) != (width, height):
    img = img.resize((new_w, new_h), Image.BILINEAR)
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  return np.asarray(img.crop((left, top, left + size, top + size)))


def resize_whole(image: np.ndarray, size: int) -> np.ndarray:
  """The whole image, bilinearly resized to size x size (aspect ratio not kept, nothing cut off)."""
  if image.shape[0] == image.shape[1] == size:
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def eval_view(image: np.ndarray, size: int, view: str) -> np.ndarray:
  """The evaluation image: `view` in EVAL_VIEWS."""
  return resize_center_crop(image, size) if view == "center_crop" else resize_whole(image, size)
