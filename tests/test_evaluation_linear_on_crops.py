"""evaluation/linear_on_crops.py, linear evaluation on the frozen trunk: masked cross-entropy, flip-only
augmentation, learning on digits, resume equal to an uninterrupted run."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from dcv2_jax import augment
from dcv2_jax.evaluation import linear_on_crops, protocol as protocols
from dcv2_jax.model.trunk import ResNet, TrunkArch


def small_setup(tmp_path):
  data_cfg = digits.get_config().data
  data_cfg.image_size_digits = 24
  trunk = ResNet(TrunkArch(18, 1, 16))
  variables = jax.jit(lambda k: trunk.init(k, jnp.zeros((1, 24, 24, 3)), train=False))(jax.random.key(0))
  apply_fn = jax.jit(lambda v, x: trunk.apply(v, x, train=False))
  cfg = protocols.linear_protocol()
  # A random-init trunk's raw features are badly scaled: a small LR, milder crops and 8 epochs.
  cfg.epochs, cfg.batch_size, cfg.crop_size, cfg.crop_scale, cfg.lr = 8, 128, 24, (0.3, 1.0), 0.1
  cfg.eval_every_epochs = 4
  return apply_fn, variables, data_cfg, cfg


def test_masked_cross_entropy_ignores_undecodable_rows():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)
  labels = jnp.asarray([0, 2, -1, 1])
  ok = jnp.asarray([True, True, False, True])
  lse = np.log(np.exp(np.asarray(logits, np.float64)).sum(1))
  want = np.mean([lse[i] - float(logits[i, int(labels[i])]) for i in (0, 1, 3)])
  assert float(linear_on_crops.masked_cross_entropy(logits, labels, ok)) == pytest.approx(want, rel=1e-5)
  g = jax.grad(lambda l: linear_on_crops.masked_cross_entropy(l, labels, ok))(logits)
  assert np.all(np.asarray(g)[2] == 0)
  assert float(linear_on_crops.masked_cross_entropy(logits, labels, jnp.zeros(4, bool))) == 0.0


def test_train_augmentation_is_flip_and_normalisation_only():
  cfg = linear_on_crops.pipeline_config(digits.get_config().data, protocols.linear_protocol(), (0.5, 0.4, 0.3),
                                     (0.2, 0.25, 0.3))
  assert cfg.data.crops == ((224, 1, 0.08, 1.0),)
  x = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
  keys = jax.random.split(jax.random.key(1), 64)
  y = np.asarray(augment.device_augment(jnp.asarray(x), keys, cfg.augment, jnp.float32))
  ref = (x / 255.0 - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.25, 0.3])
  flipped = [np.allclose(y[i], ref[i][:, ::-1], atol=1e-4) for i in range(64)]
  same = [np.allclose(y[i], ref[i], atol=1e-4) for i in range(64)]
  assert all(f or s for f, s in zip(flipped, same))          # no colour change, no blur
  assert 16 <= sum(flipped) <= 48                             # flips with p = 0.5


def test_learns_digits_and_resume_equals_uninterrupted(tmp_path):
  apply_fn, variables, data_cfg, cfg = small_setup(tmp_path)
  full = linear_on_crops.train_linear(apply_fn, variables, data_cfg, str(tmp_path / "full"), cfg, mean=(0.5,) * 3,
                                  std=(0.25,) * 3)
  assert full["epoch"] == 8 and full["val_top1"] > 0.4       # chance is 0.1 (0.53 when written)
  assert full["val_rows"] == 359                              # digits' held-out split, not the train split
  assert full["val_top1_best"] >= full["val_top1"]
  lines = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
  assert [r["epoch"] for r in lines] == list(range(1, 9)) and lines[-1]["loss"] < lines[0]["loss"]
  assert "val_top1" in lines[3] and "val_top1" not in lines[4]     # every 4 epochs and at the end

  part = str(tmp_path / "part")
  first = linear_on_crops.train_linear(apply_fn, variables, data_cfg, part, cfg, mean=(0.5,) * 3, std=(0.25,) * 3,
                                   stop_after_epoch=5)
  assert first["epoch"] == 5
  resumed = linear_on_crops.train_linear(apply_fn, variables, data_cfg, part, cfg, mean=(0.5,) * 3, std=(0.25,) * 3)
  assert resumed["epoch"] == 8
  assert resumed["val_top1"] == pytest.approx(full["val_top1"], abs=1e-9)
  assert resumed["loss"] == pytest.approx(full["loss"], rel=1e-6)

  # Asked again once complete: nothing is trained, the last record comes back.
  again = linear_on_crops.train_linear(apply_fn, variables, data_cfg, part, cfg, mean=(0.5,) * 3, std=(0.25,) * 3)
  assert again["epoch"] == 8 and again["val_top1"] == resumed["val_top1"]
  # Another protocol in the same directory is refused (the LR schedule would no longer fit the state).
  cfg.batch_size = 64
  with pytest.raises(ValueError, match="holds a linear eval"):
    linear_on_crops.train_linear(apply_fn, variables, data_cfg, part, cfg, mean=(0.5,) * 3, std=(0.25,) * 3)
