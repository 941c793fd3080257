"""Config resolution (per-device batch, LR scaling note), key checks, the recipes' published settings."""
import importlib

import pytest

from dcv2_jax import config as config_lib


def test_per_device_batch_and_lr_scaling_note():
  c = config_lib.base_config()
  c.per_device_batch_size = 64
  resolved, notes = config_lib.resolve(c, num_devices=16)
  assert resolved.batch_size == 1024 and resolved.per_device_batch_size == 0
  assert c.batch_size == 4096                       # the caller's config is left alone
  assert any("linear LR scaling" in n and "peak LR 1.2" in n for n in notes)
  c.optim.scale_lr_with_batch = False
  _, notes = config_lib.resolve(c, num_devices=16)
  assert not any("LR" in n for n in notes)


def test_unknown_keys_message():
  c = config_lib.base_config()
  assert config_lib.unknown_keys_message(c, ["loss.temperature", "model.sync_bn.group_size"]) is None
  msg = config_lib.unknown_keys_message(c, ["loss.temprature"])
  assert "did you mean loss.temperature" in msg and "optim.trust_coefficient" in msg


@pytest.mark.parametrize("name,crops,epochs", [
    ("dcv2_2crops", ((224, 2, 0.08, 1.0),), 400),
    ("dcv2_2x160_4x96", ((160, 2, 0.08, 1.0), (96, 4, 0.05, 0.14)), 400),
    ("dcv2_2x224_6x96", ((224, 2, 0.14, 1.0), (96, 6, 0.05, 0.14)), 800)])
def test_published_recipes(name, crops, epochs):
  c = importlib.import_module(f"configs.{name}").get_config()
  assert tuple(map(tuple, c.data.crops)) == crops and c.num_epochs == epochs
  assert (c.batch_size, c.loss.temperature, tuple(c.loss.num_clusters), c.loss.kmeans_iters) == (
      4096, 0.1, (3000, 3000, 3000), 10)
  assert (c.optim.name, c.optim.lr, c.optim.warmup_start_lr, c.optim.final_lr, c.optim.weight_decay) == (
      "larc", 4.8, 0.3, 0.0048, 1e-6)
  assert tuple(c.model.head_dims) == (2048, 128) and c.model.head_bn and c.model.depth == 50
  config_lib.validate(c, 1_281_167, 1_281_167 // 4096, num_devices=64, num_processes=8)


def test_bad_step_intervals():
  c = config_lib.base_config()
  c.log_every_steps = 0
  with pytest.raises(config_lib.ConfigError, match="log_every_steps=0"):
    config_lib.validate(c, 10000, 2, num_devices=8, num_processes=1)


def test_bad_kmeans_choices_all_reported():
  c = config_lib.base_config()
  c.loss.kmeans_assign, c.loss.kmeans_sums = "triton", "matmul"
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(c, 10000, 2, num_devices=8, num_processes=1)
  assert "loss.kmeans_assign='triton'" in str(err.value) and "loss.kmeans_sums='matmul'" in str(err.value)


def test_sync_bn_groups_larger_than_the_devices_become_one_group():
  """VISSL's SyncBN groups of 8 GPUs (group_size) on 1, 2 or 4 devices: the same command runs, over all devices."""
  c = importlib.import_module("configs.dcv2_2crops").get_config()
  c.model.sync_bn.samples, c.model.sync_bn.group_size = 0, 8
  resolved, notes = config_lib.resolve(c, num_devices=4)
  assert resolved.model.sync_bn.group_size == 0 and any("group_size=8 > 4" in n for n in notes)
  resolved, notes = config_lib.resolve(c, num_devices=16)
  assert resolved.model.sync_bn.group_size == 8 and not any("group_size" in n for n in notes)
  c.model.sync_bn.group_size = 8
  with pytest.raises(config_lib.ConfigError, match="group_size=8"):
    config_lib.validate(config_lib.resolve(c, 12)[0], 1_281_167, 100, num_devices=12, num_processes=1)


@pytest.mark.parametrize("platform,where,want", [("gpu", "device", "device"), ("cpu", "device", "host"),
                                                 ("gpu", "host", "host")])
def test_auto_crops_on_cuts_on_the_gpu_unless_the_colour_ops_run_on_the_host(platform, where, want):
  c = importlib.import_module("configs.dcv2_2crops").get_config()
  c.augment.where = where
  resolved, notes = config_lib.resolve(c, num_devices=8, platform=platform)
  assert resolved.data.crops_on == want and any(f"data.crops_on=auto on {platform}: {want}" in n for n in notes)
  assert resolved.data.canvas_size == (512 if want == "device" else 0)
  config_lib.validate(resolved, 1_281_167, 1000, num_devices=8, num_processes=1)     # a valid pair either way
  c.data.crops_on = "device"
  if where == "host":
    with pytest.raises(config_lib.ConfigError, match="crops_on=device with augment.where=host"):
      config_lib.validate(config_lib.resolve(c, 8, platform)[0], 1_281_167, 1000, num_devices=8, num_processes=1)


@pytest.mark.parametrize("name", ["dcv2_2crops", "dcv2_2x160_4x96", "dcv2_2x224_6x96"])
@pytest.mark.parametrize("gpus,processes", [(64, 8), (16, 2), (8, 1), (1, 1)])
def test_recipes_keep_512_samples_per_batchnorm_group_on_any_gpu_count(name, gpus, processes):
  """The published statistics batch (8 GPUs x 64 = 512 samples per SyncBN group) on 64, 16, 8 or 1 GPU(s),
  global batch 4096 kept: 8 groups of 512 whether a group spans 8 GPUs, 2, one, or 8 groups share one GPU."""
  from dcv2_jax.model import batchnorm
  c = importlib.import_module(f"configs.{name}").get_config()
  assert (c.model.sync_bn.samples, c.model.sync_bn.group_size) == (512, 0)
  resolved, _ = config_lib.resolve(c, gpus)
  config_lib.validate(resolved, 1_281_167, 1_281_167 // 4096, num_devices=gpus, num_processes=processes)
  assert batchnorm.num_groups(resolved.model.sync_bn, resolved.batch_size, gpus, gpus // processes) == 8


def test_sample_groups_that_do_not_line_up_with_the_devices_are_refused_with_the_nearest_settings():
  c = config_lib.base_config()
  c.model.sync_bn.samples = 512
  c.per_device_batch_size = 48                       # 8 x 48 = 384: no whole group of 512
  resolved, _ = config_lib.resolve(c, 8)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(resolved, 100000, 100000 // 384, num_devices=8, num_processes=1)
  msg = str(e.value)
  assert "model.sync_bn.samples=512 cannot be met exactly with 48 samples on each of 8 devices" in msg
  assert "Nearest: --config.model.sync_bn.samples=192 or 384, or --config.per_device_batch_size=64 or 128" in msg
  c.model.sync_bn.group_size = 8
  with pytest.raises(config_lib.ConfigError, match="set one"):
    config_lib.validate(config_lib.resolve(c, 8)[0], 100000, 100, num_devices=8, num_processes=1)


@pytest.mark.parametrize("crops,size,resize,want", [
    (((224, 2, 0.08, 1.0),), 0, "auto", (224, "center_crop")),                  # the published protocol
    (((160, 2, 0.08, 1.0), (96, 4, 0.05, 0.14)), 0, "auto", (224, "center_crop")),
    (((32, 2, 0.08, 1.0),), 0, "auto", (32, "whole")),                           # CIFAR: the training size
    (((96, 2, 0.08, 1.0),), 0, "auto", (96, "whole")),
    (((32, 2, 0.08, 1.0),), 40, "center_crop", (40, "center_crop")),             # both given: as given
    (((224, 2, 0.08, 1.0),), 112, "auto", (112, "center_crop"))])
def test_evaluation_size_follows_the_training_crops(crops, size, resize, want):
  c = config_lib.base_config()
  c.data.crops, c.data.eval_image_size, c.data.eval_resize = crops, size, resize
  assert config_lib.eval_view(c.data) == want
  resolved, notes = config_lib.resolve(c, 8)          # and the run's config.json records the concrete values
  assert (resolved.data.eval_image_size, resolved.data.eval_resize) == want
  assert any(f"evaluation at {want[0]} px ({want[1]})" in n for n in notes) == ((size, resize) != want)


@pytest.mark.parametrize("name,images", [("cifar10", 50_000), ("cifar100", 50_000), ("stl10", 5_000),
                                         ("imagenet100", 126_689)])
@pytest.mark.parametrize("epochs", [None, "100", "200"])
def test_small_data_recipes_validate_on_one_and_eight_gpus(name, images, epochs):
  c = importlib.import_module(f"configs.{name}").get_config(*([epochs] if epochs else []))
  assert c.num_epochs == (int(epochs) if epochs else (400 if name == "imagenet100" else 1000))
  assert (c.model.depth, tuple(c.loss.num_clusters), tuple(c.model.head_dims), c.batch_size) == (
      18, (3000, 3000, 3000), (2048, 128), 256)
  assert c.model.stem == ("cifar" if name.startswith("cifar") else "imagenet")
  for gpus in (1, 8):
    resolved, _ = config_lib.resolve(c, gpus)
    config_lib.validate(resolved, images, images // resolved.batch_size, num_devices=gpus, num_processes=1)
