"""Random-access image sources: `source[i] -> dict(image=uint8 HWC RGB, label=int)`.

Three kinds, chosen by `data.source`:
  * tfds: a dataset prepared by tensorflow-datasets in ArrayRecord format, read TF-free through
    `tfds.builder(...).as_data_source` (ImageNet: name `imagenet2012`, `data.path` = the tfds data_dir).
    Preparing ImageNet once (needs `pip install tensorflow` for that step only; reading does not):
        # put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in /data/manual
        tfds build imagenet2012 --data_dir=/data/tfds --manual_dir=/data/manual --file_format=array_record
    A copy already prepared as TFRecord converts in place of rebuilding:
        tfds convert_format --dataset_dir=/data/tfds/imagenet2012 --out_file_format=array_record
    Then `--config.data.source=tfds --config.data.name=imagenet2012 --config.data.path=/data/tfds`.
  * image_folder: one sub-directory per class of image files (VISSL's disk_folder / torchvision
    ImageFolder layout). If `<path>/<split>` is a directory it is used (e.g. imagenet/train, imagenet/val),
    else `<path>` itself for the training split. Classes and files are sorted, so indices are stable.
  * digits: scikit-learn's bundled 8x8 digits (no download), upscaled to `data.image_size_digits`, as the
    embedded demo. Splits: 'train' (4 of every 5 samples), 'validation' / 'test' (the 5th), 'all'.

Sources are pickled into the grain worker processes, so they hold paths and light handles only.
Reading an image may raise (corrupt file): the pipeline catches that per sample (see pipeline.py).
"""
from __future__ import annotations

import io
import logging
import os
from typing import Any

import numpy as np
from PIL import Image, features

try:
  import simplejpeg  # libjpeg-turbo straight into a numpy array: about 1.3x PIL's decode + copy out
except ImportError:
  simplejpeg = None

log = logging.getLogger(__name__)

SOURCES = ("tfds", "image_folder", "digits")
# torchvision's IMG_EXTENSIONS (what VISSL's disk_folder accepts); matched case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# JPEG kinds, as simplejpeg.decode_jpeg_header names them (colour space, subsampling), that simplejpeg decodes
# bit-identically to PIL (tests/test_data_sources_decode.py): the same libjpeg-turbo with the same settings. The rest goes
# to PIL: CMYK and YCCK above all, which PIL converts to RGB with its own formula (simplejpeg's differs by 1).
FAST_JPEG_KINDS = frozenset({("YCbCr", s) for s in ("444", "422", "420", "440", "411")} | {("Gray", "Gray")})
# Identical pixels need PIL's JPEG decoder to be libjpeg-turbo too (Pillow's wheels bundle it; IJG libjpeg 9
# upsamples differently).
FAST_JPEG = simplejpeg is not None and bool(features.check_feature("libjpeg_turbo"))
if not FAST_JPEG:
  log.warning("JPEGs are decoded by PIL (slower, the same pixels): %s",
              "simplejpeg is not installed" if simplejpeg is None
              else "PIL's JPEG decoder is not libjpeg-turbo, so simplejpeg's pixels could differ from it")


def _decode_jpeg_fast(data) -> np.ndarray | None:
  """simplejpeg's decode of a JPEG of FAST_JPEG_KINDS, else None (PIL's to do)."""
  if not FAST_JPEG or data[:2] != b"\xff\xd8":
    return None
  try:
    if tuple(simplejpeg.decode_jpeg_header(data)[2:]) not in FAST_JPEG_KINDS:
      return None
    # PIL's settings: the accurate integer IDCT and fancy upsampling. strict: any libjpeg warning (truncated or
    # corrupt data) raises, and PIL decides as before whether the file decodes or raises.
    return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True)
  except ValueError:
    return None


def decode_image(data: bytes | str | os.PathLike) -> np.ndarray:
  """Bytes or a path -> uint8 [H, W, 3] RGB. Raises on an undecodable or truncated file.

  Grey, palette, CMYK and alpha images are converted to RGB as torchvision's pil_loader does. JPEGs of
  FAST_JPEG_KINDS are decoded by simplejpeg (the same pixels, faster), everything else by PIL.
  """
  if not isinstance(data, (bytes, bytearray, memoryview)):
    with open(data, "rb") as f:
      data = f.read()
  image = _decode_jpeg_fast(data)
  if image is not None:
    return image
  with Image.open(io.BytesIO(data)) as img:
    # convert() forces the full decode, so a truncated file fails here and not later.
    return np.asarray(img.convert("RGB"))


class ImageFolderSource:
  """Class sub-directories of image files; label = position of the sub-directory name in sorted order."""

  def __init__(self, root: str, classes=None):
    if not root:
      raise ValueError("data.path is empty: set --config.data.path=/path/to/folder (one sub-directory per "
                       "class of JPEG/PNG files) for data.source=image_folder.")
    if not os.path.isdir(root):
      raise FileNotFoundError(f"image folder {root!r} does not exist or is not a directory: set "
                              "--config.data.path to a folder with one sub-directory per class.")
    self.root = root
    found = sorted(_class_dirs(root))
    if classes is not None:
      # Another split's class list (the training split's): the same name gets the same label even when
      # this split lacks some classes.
      unknown = sorted(set(found) - set(classes))
      if unknown:
        raise ValueError(f"image folder {root!r} has classes the training split lacks: {unknown[:10]}")
      self.classes = list(classes)
    else:
      self.classes = found
    files, labels = [], []
    for label, cls in enumerate(self.classes):
      if cls not in found:
        continue
      for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls), followlinks=True):
        dirnames.sort()  # walk order = sorted order, so indices are stable
        for name in sorted(filenames):
          if name.lower().endswith(IMAGE_EXTENSIONS):
            files.append(os.path.relpath(os.path.join(dirpath, name), root))
            labels.append(label)
    if not files:
      raise FileNotFoundError(
          f"image folder {root!r} holds no images: expected <path>/<class>/<image>"
          f"{'/'.join(IMAGE_EXTENSIONS[:3])} (found {len(self.classes)} class sub-directories). "
          "Point --config.data.path at the folder whose sub-directories are the classes.")
    # One bytes array instead of a million str objects: pickles to the workers quickly.
    self._files = np.array([f.encode() for f in files], dtype=np.bytes_)
    self._labels = np.asarray(labels, np.int32)
    self.num_classes = len(self.classes)

  def __len__(self) -> int:
    return len(self._files)

  def labels(self) -> np.ndarray:
    """Label of every sample by dataset index (for cluster metrics against labels)."""
    return self._labels

  def path(self, i: int) -> str:
    return os.path.join(self.root, self._files[i].decode())

  def describe(self, i: int) -> str:
    return self.path(i)

  def __getitem__(self, i: int) -> dict:
    return dict(image=decode_image(self.path(i)), label=int(self._labels[i]))


class TfdsSource:
  """A tfds dataset in ArrayRecord format; images are decoded here (decode_image), not by tfds, so that a bad
  record raises in our per-sample error handling and TF is never needed."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    # Late: tensorflow_datasets takes seconds to import, and only this source needs it.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    where = data_dir or "the default data_dir (~/tensorflow_datasets)"
    try:
      builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # DatasetNotFoundError (a ValueError) and friends
      raise ValueError(
          f"tfds dataset {name!r} is not known to tensorflow-datasets and was not found prepared in "
          f"{where}: check --config.data.name, or point --config.data.path at the tfds data_dir that holds "
          f"{name}/<version>/ ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    # Never let tfds download or prepare implicitly: it would try to fetch ImageNet into data_dir.
    if not builder.is_prepared():
      raise FileNotFoundError(
          f"tfds dataset {name!r} is not prepared in {where} (looked for {builder.data_path}). Prepare it "
          f"with: tfds build {name} --data_dir=<data_dir> --file_format=array_record (ImageNet also needs "
          "--manual_dir=<folder with ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar>), then set "
          "--config.data.path=<data_dir>. See docs/data.md.")
    file_format = str(getattr(builder.info, "file_format", "") or "")
    if "array_record" not in file_format.lower():
      raise ValueError(
          f"tfds dataset {name!r} in {builder.data_path} is stored as {file_format or 'tfrecord'}, which needs "
          "TensorFlow to read. Convert it once: tfds convert_format "
          f"--dataset_version_dir={builder.data_path} --out_file_format=array_record")
    splits = list(builder.info.splits.keys())
    if split not in builder.info.splits:
      raise ValueError(f"tfds dataset {name!r} has no split {split!r}; it has {splits}.")
    features = builder.info.features
    self._image_key = next((k for k, f in features.items() if isinstance(f, tfds.features.Image)), None)
    if self._image_key is None:
      raise ValueError(f"tfds dataset {name!r} has no Image feature (features: {list(features.keys())}).")
    labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    self._label_key = "label" if "label" in labels else (labels[0] if labels else None)
    self.num_classes = features[self._label_key].num_classes if self._label_key else None
    self.name, self.split = name, split
    # SkipDecoding: we get the encoded bytes and decode them ourselves.
    self._ds = builder.as_data_source(split=split, decoders={self._image_key: tfds.decode.SkipDecoding()})

  def __len__(self) -> int:
    return len(self._ds)

  def labels(self) -> None:
    # Reading every label means reading every record (the whole dataset): not worth it per epoch.
    return None

  def describe(self, i: int) -> str:
    return f"tfds {self.name}/{self.split}[{i}]"

  def __getitem__(self, i: int) -> dict:
    ex = self._ds[int(i)]
    label = int(ex[self._label_key]) if self._label_key else -1
    return dict(image=decode_image(ex[self._image_key]), label=label)


class DigitsSource:
  """scikit-learn's 1,797 8x8 digits as RGB uint8, bilinearly upscaled (the embedded demo data)."""

  SPLITS = ("train", "validation", "test", "all")

  def __init__(self, split: str, image_size: int):
    # Late: scikit-learn takes a second to import, and only the demo's data needs it.
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    if split not in self.SPLITS:
      raise ValueError(f"digits has splits {self.SPLITS}, not {split!r}.")
    d = load_digits()
    keep = np.arange(len(d.target))
    if split == "train":
      keep = keep[keep % 5 != 4]
    elif split in ("validation", "test"):
      keep = keep[keep % 5 == 4]
    grey = np.rint(d.images[keep] * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    size = int(image_size)
    up = [np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR)) for g in grey]
    self._images = np.repeat(np.stack(up)[..., None], 3, axis=-1)
    self._labels = d.target[keep].astype(np.int32)
    self.num_classes = 10

  def __len__(self) -> int:
    return len(self._labels)

  def labels(self) -> np.ndarray:
    return self._labels

  def describe(self, i: int) -> str:
    return f"digits[{i}]"

  def __getitem__(self, i: int) -> dict:
    return dict(image=self._images[i], label=int(self._labels[i]))


def _class_dirs(root: str) -> list:
  return [e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")]


def make_source(data_cfg: Any, split: str | None = None):
  """The source for `data_cfg.source` and `split` (default `data_cfg.split`)."""
  kind = data_cfg.source
  split = data_cfg.split if split is None else split
  path = data_cfg.get("path", "") if hasattr(data_cfg, "get") else getattr(data_cfg, "path", "")
  if kind == "tfds":
    return TfdsSource(data_cfg.name, split, path or None)
  if kind == "image_folder":
    if path and os.path.isdir(os.path.join(path, split)):
      train = os.path.join(path, data_cfg.split)
      classes = sorted(_class_dirs(train)) if split != data_cfg.split and os.path.isdir(train) else None
      return ImageFolderSource(os.path.join(path, split), classes)
    if split != data_cfg.split:
      raise FileNotFoundError(
          f"image folder {path!r} has no sub-folder {split!r} for split {split!r}: create {path}/{split}/ "
          "with one sub-directory per class, or set --config.data.eval_split='' to skip evaluation.")
    return ImageFolderSource(path)
  if kind == "digits":
    return DigitsSource(split, data_cfg.get("image_size_digits", 32))
  raise ValueError(f"unknown data.source {kind!r}: valid sources are {', '.join(SOURCES)}.")
