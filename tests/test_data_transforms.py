"""CPU crops (dcv2_jax/data/transforms.py) against torchvision's RandomResizedCrop, Resize and CenterCrop."""
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import stats

from dcv2_jax.data import transforms

pytestmark = pytest.mark.torch


def draw_boxes(height, width, scale, n, seed=0):
  rng = np.random.default_rng(seed)
  return np.asarray([transforms.random_resized_crop_box(rng, height, width, scale) for _ in range(n)])


def torchvision_boxes(height, width, scale, n, seed=0):
  torch.manual_seed(seed)
  img = torch.zeros(3, height, width)
  return np.asarray([T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(n)])


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.14, 1.0), (0.05, 0.14)])
def test_crop_scale_and_ratio_distribution_matches_torchvision(scale):
  height, width, n = 375, 500, 4000
  ours, ref = draw_boxes(height, width, scale, n), torchvision_boxes(height, width, scale, n)
  for boxes in (ours, ref):
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
  area = lambda b: b[:, 2] * b[:, 3] / (height * width)
  log_ratio = lambda b: np.log(b[:, 3] / b[:, 2])
  a = area(ours)
  # rounding h and w to pixels moves the area by ~1% either way
  assert a.min() >= scale[0] * 0.97 and a.max() <= min(1.0, scale[1] * 1.03)
  r = np.exp(log_ratio(ours))
  assert r.min() >= 0.75 * 0.97 and r.max() <= 4 / 3 * 1.03
  # same distributions as torchvision's sampler (two-sample KS), including its rejection of boxes that
  # do not fit
  assert stats.ks_2samp(a, area(ref)).pvalue > 1e-3
  assert stats.ks_2samp(log_ratio(ours), log_ratio(ref)).pvalue > 1e-3
  # positions uniform over the valid range: mean relative offset 1/2
  rel_top = ours[:, 0] / np.maximum(height - ours[:, 2], 1)
  assert abs(rel_top[ours[:, 2] < height].mean() - 0.5) < 0.03


def test_crop_fallback_is_torchvision_centre_crop():
  for height, width in ((10, 400), (400, 10)):
    ours = draw_boxes(height, width, (0.9, 1.0), 5)
    ref = torchvision_boxes(height, width, (0.9, 1.0), 5)
    np.testing.assert_array_equal(ours, ref)  # deterministic fallback: every try fails


def test_resized_crop_pixels_close_to_torchvision():
  rng = np.random.default_rng(1)
  coarse = (rng.random((8, 10, 3)) * 255).astype(np.uint8)
  img = Image.fromarray(coarse).resize((100, 80), Image.BICUBIC)
  box = (10, 20, 50, 40)  # top, left, h, w
  ours = transforms.resized_crop(img, box, 32).astype(np.float32)
  ref = np.asarray(TF.resized_crop(img, *box, [32, 32], interpolation=T.InterpolationMode.BILINEAR)).astype(np.float32)
  assert ours.shape == (32, 32, 3)
  # identical filter; PIL's box resize may read one pixel beyond the crop at the border
  assert np.abs(ours[2:-2, 2:-2] - ref[2:-2, 2:-2]).max() <= 1
  assert np.abs(ours - ref).mean() < 1.5


def test_multi_crop_shapes_and_determinism():
  image = (np.random.default_rng(2).random((60, 90, 3)) * 255).astype(np.uint8)
  crops = ((32, 2, 0.14, 1.0), (16, 3, 0.05, 0.14))
  a = transforms.multi_crop(image, transforms.sample_rng(0, 1, 7), crops)
  b = transforms.multi_crop(image, transforms.sample_rng(0, 1, 7), crops)
  c = transforms.multi_crop(image, transforms.sample_rng(0, 2, 7), crops)
  assert [x.shape for x in a] == [(2, 32, 32, 3), (3, 16, 16, 3)] and a[0].dtype == np.uint8
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("shape", [(375, 500), (500, 375), (300, 300), (20, 30)])
def test_eval_resize_centre_crop_is_torchvision(shape):
  rng = np.random.default_rng(3)
  image = (rng.random(shape + (3,)) * 255).astype(np.uint8)
  size = 24
  ref = T.Compose([T.Resize(round(size * 256 / 224), interpolation=T.InterpolationMode.BILINEAR),
                   T.CenterCrop(size)])(Image.fromarray(image))
  np.testing.assert_array_equal(transforms.resize_center_crop(image, size), np.asarray(ref))
  assert math.isclose(round(224 * 256 / 224), 256)


def test_eval_views_whole_image_and_centre_crop():
  img = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
  whole = transforms.eval_view(img, 32, "whole")
  want = np.asarray(TF.resize(Image.fromarray(img), [32, 32], interpolation=T.InterpolationMode.BILINEAR))
  assert whole.shape == (32, 32, 3) and np.abs(whole.astype(int) - want.astype(int)).max() <= 1
  crop = transforms.eval_view(img, 32, "center_crop")
  np.testing.assert_array_equal(crop, transforms.resize_center_crop(img, 32))
  square = img[:32, :32]
  np.testing.assert_array_equal(transforms.eval_view(square, 32, "whole"), square)     # nothing to do
