"""Crops cut on the device (device_crops.py) against the host's PIL crops of the same images at the same boxes: every
recipe's crop sizes, boxes at the image's borders, images smaller than the crop, images on a larger canvas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dcv2_jax import device_crops
from dcv2_jax.bench.pipeline import natural_jpeg
from dcv2_jax.data import sources, transforms

CANVAS = 512
# (size, min_scale, max_scale) of every recipe's crops: dcv2_2crops, dcv2_2x160_4x96, dcv2_2x224_6x96, the CIFAR,
# STL-10 and digits recipes.
RECIPE_CROPS = [(224, 0.08, 1.0), (160, 0.08, 1.0), (96, 0.05, 0.14), (224, 0.14, 1.0), (32, 0.2, 1.0),
                (96, 0.2, 1.0), (32, 0.5, 1.0)]


@pytest.fixture(scope="module")
def photos():
  """Photo-like decoded JPEGs: landscape, portrait, small, smaller than every ImageNet crop, and square."""
  rng = np.random.default_rng(0)
  return [sources.decode_image(natural_jpeg(rng, w, h)) for w, h in [(500, 375), (375, 500), (200, 150), (60, 45),
                                                                      (512, 512)]]


def boxes_for(image, lo, hi, seed=1):
  h, w = image.shape[:2]
  rng = np.random.default_rng(seed)
  drawn = transforms.crop_boxes(rng, h, w, ((0, 12, lo, hi),)).astype(int)
  border = [(0, 0, h, w), (h - 10, w - 10, 10, 10), (0, w - 7, 5, 7), (h - 3, 0, 3, min(w, 40))]
  return [tuple(b) for b in drawn] + border


def on_canvas(image):
  canvas = np.zeros((CANVAS, CANVAS, 3), np.uint8)
  canvas[:image.shape[0], :image.shape[1]] = image
  return canvas


@pytest.mark.parametrize("size,lo,hi", RECIPE_CROPS)
def test_device_crops_match_the_host_crops(photos, size, lo, hi):
  """Within 0.25 levels on average and 2 at most, rounded to 8 bits as the host's are (PIL rounds between its two
  passes too; the rest is float rounding)."""
  for image in photos:
    boxes = boxes_for(image, lo, hi)
    host = np.stack([transforms.resized_crop(Image.fromarray(image), b, size) for b in boxes]).astype(np.float32)
    ours = device_crops.resized_crops(jnp.asarray(on_canvas(image)[None]), jnp.asarray([image.shape[:2]], jnp.int32),
                                      jnp.asarray([boxes], jnp.float32), size)[0]
    diff = np.abs(np.clip(np.rint(np.asarray(ours)), 0, 255) - host)
    assert diff.mean() <= 0.25 and diff.max() <= 2, (image.shape, size, diff.mean(), diff.max())


def test_the_canvas_padding_never_reaches_a_crop(photos):
  """The canvas beyond the image's true size takes no part: filling it with anything changes no crop."""
  image = photos[2]
  h, w = image.shape[:2]
  boxes = jnp.asarray([boxes_for(image, 0.08, 1.0)], jnp.float32)
  size = jnp.asarray([[h, w]], jnp.int32)
  zeros = on_canvas(image)
  noise = np.random.default_rng(5).integers(0, 256, zeros.shape, dtype=np.uint8)
  noise[:h, :w] = image
  a = device_crops.resized_crops(jnp.asarray(zeros[None]), size, boxes, 96)
  b = device_crops.resized_crops(jnp.asarray(noise[None]), size, boxes, 96)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-3)


def test_weights_are_a_partition_of_unity_over_the_image():
  """Every output pixel's weights sum to 1 over the image's pixels and are 0 beyond them (an undecodable sample,
  image size 0, gets all-zero weights and crops, not NaN)."""
  w = device_crops.resize_weights(jnp.asarray([3.0, 0.0]), jnp.asarray([50.0, 0.0]), 24, jnp.asarray([60, 0]), 64)
  np.testing.assert_allclose(np.asarray(w[0]).sum(-1), 1.0, rtol=1e-6)
  assert (np.asarray(w[0])[:, 60:] == 0).all()
  assert (np.asarray(w[1]) == 0).all() and np.isfinite(np.asarray(w[1])).all()


def test_cut_gives_the_groups_in_order_and_cut_one_a_single_crop(photos):
  image = photos[0]
  groups = ((32, 2), (16, 3))
  boxes = np.stack([b for b in boxes_for(image, 0.1, 1.0)[:5]]).astype(np.float32)
  batch = {"image": jnp.asarray(on_canvas(image)[None]), "image_size": jnp.asarray([image.shape[:2]], jnp.int32),
           "boxes": jnp.asarray(boxes[None])}
  big, small = jax.jit(lambda b: device_crops.cut(b, groups))(batch)
  assert big.shape == (1, 2, 32, 32, 3) and small.shape == (1, 3, 16, 16, 3)
  np.testing.assert_allclose(np.asarray(device_crops.cut_one(batch, 3, 16))[0, 0], np.asarray(small)[0, 1], atol=1e-4)
  assert device_crops.crops_of({"crops": ["host crops"]}, groups) == ["host crops"]
