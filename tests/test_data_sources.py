"""Data sources: digits, image folders, tfds ArrayRecord (built here, offline), and their error messages."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from dcv2_jax import config as config_lib
from dcv2_jax.data import Pipeline, eval_batches, make_source

import tensorflow_datasets as tfds


def data_cfg(**kw):
  d = config_lib.base_config().data
  for k, v in kw.items():
    setattr(d, k, v)
  return d


def encode(array, fmt):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt)
  return buf.getvalue()


def make_folder(root, layout, seed=0):
  """layout: {class: [file names]}; images of random sizes, JPEG or PNG by extension."""
  rng = np.random.default_rng(seed)
  for cls, names in layout.items():
    for name in names:
      path = os.path.join(root, cls, name)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      img = rng.integers(0, 255, (int(rng.integers(20, 40)), int(rng.integers(20, 40)), 3), dtype=np.uint8)
      ext = name.lower().rsplit(".", 1)[-1]
      with open(path, "wb") as f:
        f.write(encode(img, "PNG" if ext == "png" else "JPEG") if ext in ("png", "jpg", "jpeg") else b"notes")


def test_digits_source():
  from sklearn.datasets import load_digits
  train = make_source(data_cfg(source="digits", split="train", image_size_digits=16))
  val = make_source(data_cfg(source="digits", split="validation", image_size_digits=16))
  assert len(train) + len(val) == 1797 and len(val) == 360 - 1  # every 5th sample
  assert train.num_classes == 10
  ex = train[3]
  assert ex["image"].shape == (16, 16, 3) and ex["image"].dtype == np.uint8
  np.testing.assert_array_equal(ex["image"][..., 0], ex["image"][..., 2])  # grey as RGB
  d = load_digits()
  assert ex["label"] == d.target[3]
  # independent check of the 0..16 -> 0..255 scaling and the bilinear upscale
  grey = np.rint(d.images[3] * 255 / 16).astype(np.uint8)
  want = np.asarray(Image.fromarray(grey).resize((16, 16), Image.BILINEAR))
  np.testing.assert_array_equal(ex["image"][..., 1], want)
  assert val[0]["label"] == d.target[4]


def test_image_folder_order_labels_and_formats(tmp_path):
  make_folder(tmp_path, {"b_cls": ["z.jpg", "a.PNG", "sub/c.jpeg", "readme.txt"], "a_cls": ["1.png", "0.jpg"],
                         "empty_cls": []})
  os.makedirs(tmp_path / "empty_cls", exist_ok=True)
  Image.new("L", (9, 7), 128).save(tmp_path / "a_cls" / "2gray.png")
  src = make_source(data_cfg(source="image_folder", path=str(tmp_path)))
  assert src.classes == ["a_cls", "b_cls", "empty_cls"] and src.num_classes == 3
  names = [os.path.relpath(src.path(i), tmp_path) for i in range(len(src))]
  assert names == ["a_cls/0.jpg", "a_cls/1.png", "a_cls/2gray.png", "b_cls/a.PNG", "b_cls/z.jpg", "b_cls/sub/c.jpeg"]
  assert [src[i]["label"] for i in range(len(src))] == [0, 0, 0, 1, 1, 1]
  gray = src[2]["image"]
  assert gray.shape == (7, 9, 3) and (gray == 128).all()


def test_image_folder_split_subdirectory(tmp_path):
  make_folder(tmp_path / "train", {"x": ["1.jpg", "2.jpg"], "y": ["3.jpg"]})
  make_folder(tmp_path / "val", {"x": ["4.jpg"], "y": ["5.jpg"]})
  cfg = data_cfg(source="image_folder", path=str(tmp_path), split="train")
  assert len(make_source(cfg)) == 3
  assert len(make_source(cfg, "val")) == 2
  with pytest.raises(FileNotFoundError, match="validation"):
    make_source(cfg, "validation")


@pytest.mark.parametrize("kind", ["missing", "empty", "no_images"])
def test_image_folder_errors_name_the_path(tmp_path, kind):
  path = tmp_path / "nope"
  if kind == "empty":
    path.mkdir()
  elif kind == "no_images":
    make_folder(path, {"cls": ["notes.txt"]})
  with pytest.raises(FileNotFoundError) as e:
    make_source(data_cfg(source="image_folder", path=str(path)))
  assert str(path) in str(e.value) and "data.path" in str(e.value)


def test_unknown_source_lists_valid_ones():
  with pytest.raises(ValueError) as e:
    make_source(data_cfg(source="webdataset"))
  for name in ("tfds", "image_folder", "digits", "webdataset"):
    assert name in str(e.value)


# --- tfds ------------------------------------------------------------------------------------------------

class Dcv2TestTinyImages(tfds.core.GeneratorBasedBuilder):
  """A tiny image-classification dataset written here as ArrayRecord, like a prepared imagenet2012."""

  VERSION = tfds.core.Version("1.0.0")
  IMAGES = {"train": 12, "validation": 5}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)),
                                             "label": tfds.features.ClassLabel(num_classes=4)}))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split, n) for split, n in self.IMAGES.items()}

  def _generate_examples(self, split, n):
    for i in range(n):
      yield i, {"image": encode(self.image(split, i), "PNG"), "label": i % 4}

  @staticmethod
  def image(split, i):
    rng = np.random.default_rng([len(split), i])
    return rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  Dcv2TestTinyImages(data_dir=str(root), file_format="array_record").download_and_prepare()
  return str(root)


def test_tfds_array_record_source(tfds_dir):
  cfg = data_cfg(source="tfds", name="dcv2_test_tiny_images", path=tfds_dir, split="train")
  src = make_source(cfg)
  assert len(src) == 12 and src.num_classes == 4
  # tfds stores examples in its own (hashed) order: check the set of (image, label) pairs
  want = {(Dcv2TestTinyImages.image("train", i).tobytes(), i % 4) for i in range(12)}
  got = {(src[i]["image"].tobytes(), src[i]["label"]) for i in range(12)}
  assert got == want
  assert len(make_source(cfg, "validation")) == 5


def test_tfds_pipeline_and_eval(tfds_dir):
  c = config_lib.base_config()
  c.data.source, c.data.name, c.data.path = "tfds", "dcv2_test_tiny_images", tfds_dir
  c.data.num_workers, c.data.crops, c.batch_size = 0, ((16, 2, 0.14, 1.0), (8, 1, 0.05, 0.14)), 4
  p = Pipeline(c, process_index=0, process_count=1)
  assert p.steps_per_epoch == 3 and p.num_classes == 4
  batches = list(p.iterate(0))
  index = np.concatenate([b["index"] for b in batches])
  assert sorted(index) == list(range(12))
  labels = np.concatenate([b["label"] for b in batches])
  src = make_source(c.data)
  assert [src[i]["label"] for i in index] == list(labels)
  assert batches[0]["crops"][0].shape == (4, 2, 16, 16, 3)
  ev = list(eval_batches(c.data, "validation", 4, 16, 0, 1))
  assert len(ev) == 2 and ev[1]["valid"].tolist() == [True, False, False, False]


def test_tfds_unknown_dataset_and_wrong_data_dir(tmp_path, tfds_dir):
  with pytest.raises(ValueError) as e:
    make_source(data_cfg(source="tfds", name="no_such_dataset_xyz", path=str(tmp_path)))
  assert "no_such_dataset_xyz" in str(e.value) and str(tmp_path) in str(e.value)
  # a registered dataset (ImageNet) that is not prepared in data_dir: a message, and no download attempt
  with pytest.raises(FileNotFoundError) as e:
    make_source(data_cfg(source="tfds", name="imagenet2012", path=str(tmp_path)))
  msg = str(e.value)
  assert str(tmp_path) in msg and "tfds build imagenet2012" in msg and "array_record" in msg
  assert not any(p.name == "downloads" for p in tmp_path.rglob("*"))
  with pytest.raises(ValueError, match="no split 'test'"):
    make_source(data_cfg(source="tfds", name="dcv2_test_tiny_images", path=tfds_dir, split="test"))


def test_image_folder_eval_split_labels_follow_the_training_classes(tmp_path):
  for split, classes in (("train", ("ant", "bee", "cat")), ("val", ("ant", "cat"))):   # val lacks "bee"
    for cls in classes:
      os.makedirs(tmp_path / split / cls)
      Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / split / cls / "a.png")
  cfg = config_lib.base_config().data
  cfg.source, cfg.path, cfg.split = "image_folder", str(tmp_path), "train"
  val = make_source(cfg, "val")
  assert [val[i]["label"] for i in range(len(val))] == [0, 2]      # cat keeps label 2
  assert [make_source(cfg)[i]["label"] for i in range(3)] == [0, 1, 2]
