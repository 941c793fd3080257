"""Linear evaluation on the frozen trunk: the published schedule, flip-only augmentation, learning on
digits, resume equal to an uninterrupted run, and the CLI on a training workdir."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from dcv2_jax import augment, linear_eval
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


def test_schedule_is_cosine_per_epoch():
  cfg = protocols.linear_protocol()
  for epoch in (0, 1, 37, 99):
    want = 0.3 * 0.5 * (1 + math.cos(math.pi * epoch / 100))
    assert abs(float(protocols.lr_at_epoch(cfg, epoch)) - want) < 1e-6
  assert float(protocols.lr_at_epoch(cfg, 0)) == pytest.approx(0.3)


def test_optimizer_is_torch_sgd_with_the_epoch_lr():
  """sgd_without_lr + the step's -lr(epoch) scaling against torch.optim.SGD's update, written out: coupled
  weight decay on every parameter, momentum buffer starting at the first gradient, LR of the epoch."""
  cfg = protocols.linear_protocol()
  cfg.epochs, cfg.weight_decay, cfg.momentum = 4, 1e-2, 0.9
  tx = protocols.sgd_without_lr(cfg)
  rng = np.random.default_rng(0)
  p = {"kernel": rng.normal(size=(3, 2)), "bias": rng.normal(size=(2,))}
  ref = {k: v.copy() for k, v in p.items()}
  buf = None
  state = tx.init(jax.tree.map(jnp.asarray, p))
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p)
  for t, epoch in enumerate([0, 0, 1, 1, 2, 3]):
    g = {k: rng.normal(size=v.shape) for k, v in p.items()}
    lr = 0.3 * 0.5 * (1 + math.cos(math.pi * epoch / 4))
    d = {k: g[k] + 1e-2 * ref[k] for k in ref}
    buf = d if buf is None else {k: 0.9 * buf[k] + d[k] for k in d}
    ref = {k: ref[k] - lr * buf[k] for k in ref}
    updates, state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, params)
    params = jax.tree.map(lambda q, u: q - protocols.lr_at_epoch(cfg, epoch) * u, params, updates)
  for k in ref:
    np.testing.assert_allclose(np.asarray(params[k]), ref[k], rtol=1e-5, atol=1e-6)


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


def test_cli_on_a_training_workdir(tmp_path, capsys):
  """The command on a run's workdir (weights, config.json, data) learns the digits: val top-1 well above
  chance (0.1). The run trains one epoch at a gentle LR, which leaves its features well scaled for the
  published protocol's raw-feature Linear layer (at the demo's LR 4.8 they grow to norms of ~600 in one
  epoch and SGD at any LR stays at chance)."""
  from dcv2_jax.trainer import train_and_evaluate
  c = digits.get_config()
  c.data.image_size_digits, c.data.crops = 16, ((16, 2, 0.4, 1.0),)
  c.model.base_width, c.model.head_dims, c.loss.num_clusters = 8, (32, 16), (10, 10, 10)
  c.num_epochs, c.eval_at_end = 1, False
  c.optim.lr, c.optim.warmup_start_lr = 0.3, 0.03
  workdir = str(tmp_path / "run")
  train_and_evaluate(c, workdir)
  record = linear_eval.main(["--workdir", workdir, "--epochs", "8", "--lr", "0.3", "--eval_every_epochs", "1"])
  assert record["epoch"] == 8 and 0.25 < record["val_top1"] <= 1.0        # 0.34 when written
  lines = [json.loads(l) for l in open(os.path.join(workdir, "linear_eval", "metrics.jsonl"))]
  assert [r["epoch"] for r in lines] == list(range(1, 9)) and all("val_top5" in r for r in lines)
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed["linear_eval"]["epoch"] == 8
  assert os.path.isdir(os.path.join(workdir, "linear_eval", "checkpoints", "8"))
