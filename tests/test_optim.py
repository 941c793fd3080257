"""apex-LARC + SGD against the spec's formula; the LR schedule against the SwAV-repo formula."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dcv2_jax.config import base_config
from dcv2_jax.optim import apex_larc, lr_schedule, make_optimizer


def reference_larc_sgd(params, grads_per_step, lrs, wd, tc, eps, momentum, clip=False):
  params = {k: v.astype(np.float64).copy() for k, v in params.items()}
  buf = {k: np.zeros_like(v) for k, v in params.items()}
  for grads, lr in zip(grads_per_step, lrs):
    for k in params:
      p, g = params[k], grads[k].astype(np.float64)
      pn, gn = np.linalg.norm(p), np.linalg.norm(g)
      if pn != 0 and gn != 0:
        ratio = tc * pn / (gn + pn * wd + eps)
        if clip:
          ratio = min(ratio / lr, 1.0)
        g = (g + wd * p) * ratio
      buf[k] = momentum * buf[k] + g
      params[k] = p - lr * buf[k]
  return params


@pytest.mark.parametrize("clip", [False, True])
def test_larc_matches_apex_formula(clip):
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": np.zeros(3, np.float32),
            "s": rng.normal(size=(5,)).astype(np.float32)}
  grads = []
  for step in range(5):
    g = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    if step == 2:
      g["s"] = np.zeros_like(g["s"])          # zero gradient: plain SGD, no decay
    grads.append(g)
  schedule = lambda count: 0.5 + 0.25 * count  # changing LR
  lrs = [schedule(i) for i in range(5)]
  wd, tc, eps = 0.1, 0.02, 1e-8                # large wd/tc so a wrong formula shows
  tx = optax.chain(apex_larc(wd, tc, eps, clip, schedule), optax.trace(decay=0.9),
                   optax.scale_by_learning_rate(schedule))
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for g in grads:
    upd, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, upd)
  ref = reference_larc_sgd(params, grads, lrs, wd, tc, eps, 0.9, clip)
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=2e-5, atol=1e-6)
  # The zero-norm bias got plain SGD without decay for its first step, then LARC once it was non-zero.
  assert np.any(np.asarray(p["b"]) != 0)


def test_make_optimizer_larc_is_the_reference():
  c = base_config()
  c.batch_size, c.num_epochs = 256, 2
  c.optim.warmup_epochs = 1
  tx, schedule = make_optimizer(c, steps_per_epoch=3)
  rng = np.random.default_rng(1)
  params = {"w": rng.normal(size=(6,)).astype(np.float32)}
  grads = [{"w": rng.normal(size=(6,)).astype(np.float32)} for _ in range(6)]
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for g in grads:
    upd, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, upd)
  ref = reference_larc_sgd(params, grads, [float(schedule(i)) for i in range(6)], 1e-6, 1e-3, 1e-8, 0.9)
  np.testing.assert_allclose(np.asarray(p["w"]), ref["w"], rtol=1e-5)


def test_schedule_warmup_cosine_and_linear_scaling():
  c = base_config()
  c.batch_size, c.num_epochs = 1024, 20
  c.optim.warmup_epochs = 10
  steps = 5
  s = lr_schedule(c, steps)
  scale = 1024 / 4096
  total, warm = 100, 50
  assert np.isclose(float(s(0)), 0.3 * scale)
  assert np.isclose(float(s(warm // 2)), (0.3 + (4.8 - 0.3) * 0.5) * scale, rtol=1e-5)
  for t in (warm, 70, 99):   # SwAV: final + 0.5 (base - final)(1 + cos(pi t / (total - warmup)))
    expect = 0.0048 + 0.5 * (4.8 - 0.0048) * (1 + np.cos(np.pi * (t - warm) / (total - warm)))
    np.testing.assert_allclose(float(s(t)), expect * scale, rtol=1e-5)
  c.optim.scale_lr_with_batch = False
  assert np.isclose(float(lr_schedule(c, steps)(warm)), 4.8)


def test_unknown_optimizer_message():
  c = base_config()
  c.optim.name = "adamw"
  with pytest.raises(ValueError, match="larc"):
    make_optimizer(c, 10)
