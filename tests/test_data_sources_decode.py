"""decode_image: simplejpeg's fast path gives PIL's pixels (torchvision's pil_loader: Image.open(f).convert("RGB"))
bit for bit, everything it does not take goes to PIL, and broken files still raise."""
import importlib.util
import io
import logging
import sys

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from dcv2_jax.bench.pipeline import natural_jpeg
from dcv2_jax.data import sources


def pil_pixels(data):
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def photo(width, height, seed=0):
  """A photo-like RGB image (edges, grain, smooth colour) of any size."""
  rng = np.random.default_rng(seed)
  src = Image.open(io.BytesIO(natural_jpeg(rng, max(width, 60), max(height, 60))))
  return src.convert("RGB").resize((width, height), Image.BICUBIC)


def jpeg(img, **kw):
  buf = io.BytesIO()
  img.save(buf, "JPEG", **kw)
  return buf.getvalue()


def encode(img, fmt, **kw):
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


SIZES = [(500, 375), (333, 217), (17, 9), (7, 101), (1, 1), (641, 479)]   # odd widths and heights, MCU edges


def fast_cases():
  """(name, JPEG bytes, (colour space, subsampling) its header must report): every kind FAST_JPEG_KINDS holds."""
  cases = []
  for i, (w, h) in enumerate(SIZES):
    img = photo(w, h, seed=i)
    for sub, kind in (("4:2:0", "420"), ("4:2:2", "422"), ("4:4:4", "444")):
      for q in (75, 85, 95):
        cases.append((f"{w}x{h} {sub} q{q}", jpeg(img, quality=q, subsampling=sub), ("YCbCr", kind)))
      cases.append((f"{w}x{h} {sub} progressive", jpeg(img, quality=90, subsampling=sub, progressive=True),
                    ("YCbCr", kind)))
      cases.append((f"{w}x{h} {sub} optimized", jpeg(img, quality=90, subsampling=sub, optimize=True),
                    ("YCbCr", kind)))
    for q in (75, 95):
      cases.append((f"{w}x{h} grey q{q}", jpeg(img.convert("L"), quality=q), ("Gray", "Gray")))
    cases.append((f"{w}x{h} grey progressive", jpeg(img.convert("L"), quality=90, progressive=True),
                  ("Gray", "Gray")))
    # PIL writes neither 4:4:0 nor 4:1:1 (its "4:1:1" is 4:2:0): libjpeg-turbo's own encoder does.
    for sub in ("440", "411"):
      cases.append((f"{w}x{h} {sub}", simplejpeg.encode_jpeg(np.asarray(img), quality=85, colorsubsampling=sub),
                    ("YCbCr", sub)))
  return cases


def test_fast_path_is_bit_identical_to_pil():
  assert sources.FAST_JPEG   # simplejpeg is installed and PIL decodes with libjpeg-turbo: the fast path is on
  cases = fast_cases()
  assert {kind for _, _, kind in cases} == sources.FAST_JPEG_KINDS   # every kind the fast path takes is tried
  for name, data, kind in cases:
    assert tuple(simplejpeg.decode_jpeg_header(data)[2:]) == kind, name
    fast = sources._decode_jpeg_fast(data)   # pylint: disable=protected-access
    assert fast is not None, name   # taken by simplejpeg, not handed to PIL
    want = pil_pixels(data)
    assert fast.dtype == np.uint8 and fast.shape == want.shape, name
    np.testing.assert_array_equal(fast, want, err_msg=name)
    np.testing.assert_array_equal(sources.decode_image(data), want, err_msg=name)


def test_paths_and_buffers_decode_alike(tmp_path):
  data = natural_jpeg(np.random.default_rng(3), 500, 375)
  (tmp_path / "a.jpg").write_bytes(data)
  want = pil_pixels(data)
  for arg in (data, bytearray(data), memoryview(data), str(tmp_path / "a.jpg"), tmp_path / "a.jpg"):
    got = sources.decode_image(arg)
    assert got.shape == (375, 500, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode", ["CMYK", "RGB"])
def test_cmyk_and_other_formats_go_to_pil(tmp_path, mode):
  img = photo(53, 37, seed=5).convert(mode)
  files = {"cmyk.jpg": jpeg(img, quality=90)} if mode == "CMYK" else {
      "rgb.png": encode(img, "PNG"), "rgba.png": encode(img.convert("RGBA"), "PNG"),
      "grey.png": encode(img.convert("L"), "PNG"), "palette.png": encode(img.convert("P"), "PNG"),
      "a.bmp": encode(img, "BMP"), "a.ppm": encode(img, "PPM"), "a.pgm": encode(img.convert("L"), "PPM"),
      "a.tif": encode(img, "TIFF"), "a.webp": encode(img, "WEBP", lossless=True)}
  for name, data in files.items():
    assert sources._decode_jpeg_fast(data) is None, name   # pylint: disable=protected-access
    want = pil_pixels(data)
    assert want.shape == (37, 53, 3), name
    np.testing.assert_array_equal(sources.decode_image(data), want, err_msg=name)
    (tmp_path / name).write_bytes(data)
    np.testing.assert_array_equal(sources.decode_image(tmp_path / name), want, err_msg=name)


def test_jpeg_with_a_libjpeg_warning_decodes_as_pil_does():
  """simplejpeg raises on a libjpeg warning that PIL lets pass (stray bytes before a marker): PIL decodes it."""
  data = jpeg(photo(80, 64, seed=6), quality=90)
  sos = data.index(b"\xff\xda")
  stray = data[:sos] + b"\x00\x01" + data[sos:]
  assert sources._decode_jpeg_fast(stray) is None   # pylint: disable=protected-access
  want = pil_pixels(stray)
  np.testing.assert_array_equal(sources.decode_image(stray), want)
  np.testing.assert_array_equal(want, pil_pixels(data))


def broken_files():
  data = jpeg(photo(120, 90, seed=7), quality=90)
  png = encode(photo(30, 20, seed=8), "PNG")
  sos = data.index(b"\xff\xda")
  return {"jpeg cut in half": data[:len(data) // 2], "jpeg without EOI": data[:-2], "jpeg cut 10 bytes short":
          data[:-10], "jpeg cut in the header": data[:sos - 10], "jpeg SOI only": data[:2],
          "SOI then zeros": b"\xff\xd8" + bytes(200), "empty": b"", "text": b"not an image", "png cut": png[:-30]}


@pytest.mark.parametrize("name", list(broken_files()))
def test_broken_and_truncated_files_raise(tmp_path, name):
  data = broken_files()[name]
  with pytest.raises(OSError):   # PIL's own errors (UnidentifiedImageError is an OSError), as before
    sources.decode_image(data)
  (tmp_path / "x.jpg").write_bytes(data)
  with pytest.raises(OSError):
    sources.decode_image(tmp_path / "x.jpg")


def test_without_simplejpeg_everything_goes_to_pil_with_the_same_pixels(monkeypatch, caplog):
  # A fresh copy of sources.py imported while `import simplejpeg` fails, as on a machine without it.
  monkeypatch.setitem(sys.modules, "simplejpeg", None)
  spec = importlib.util.spec_from_file_location("sources_without_simplejpeg", sources.__file__)
  without = importlib.util.module_from_spec(spec)
  with caplog.at_level(logging.WARNING):
    spec.loader.exec_module(without)
  assert without.simplejpeg is None and not without.FAST_JPEG
  assert [r.getMessage() for r in caplog.records if "simplejpeg" in r.getMessage()] == [
      "JPEGs are decoded by PIL (slower, the same pixels): simplejpeg is not installed"]
  for name, data, _ in fast_cases()[::7]:
    assert without._decode_jpeg_fast(data) is None, name   # pylint: disable=protected-access
    np.testing.assert_array_equal(without.decode_image(data), sources.decode_image(data), err_msg=name)
  with pytest.raises(OSError):
    without.decode_image(broken_files()["jpeg cut in half"])
