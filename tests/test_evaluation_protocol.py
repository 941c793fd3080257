"""evaluation/protocol.py: the published linear-eval schedule (cosine per epoch) and its optimizer (torch's SGD,
written out)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcv2_jax.evaluation import protocol as protocols


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
