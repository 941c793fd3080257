"""Optimizers and the learning-rate schedule of the published DCv2 runs.

`larc` reproduces apex LARC wrapped around SGD, as the reference trains. optax.lars is close but not
the same (spec: its trust-ratio denominator is |g + wd p|, it applies the LR before momentum, and it
decays zero-norm tensors), so the trust-ratio step is written here as an optax transform and chained
with optax's own momentum and LR scaling; `lars` gives optax.lars unchanged for comparison.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("larc", "lars", "sgd")   # optim.name


def scaled_lr(config, lr: float) -> float:
  """The linear scaling rule: an LR given for lr_reference_batch, used at config.batch_size."""
  o = config.optim
  return lr * config.batch_size / o.lr_reference_batch if o.scale_lr_with_batch else lr


def lr_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up warmup_start_lr -> lr over warmup_epochs, then cosine lr -> final_lr, per step."""
  o = config.optim
  total = config.num_epochs * steps_per_epoch
  warmup = min(o.warmup_epochs * steps_per_epoch, total)
  peak, start, final = (scaled_lr(config, v) for v in (o.lr, o.warmup_start_lr, o.final_lr))
  cosine = optax.cosine_decay_schedule(peak, max(total - warmup, 1), alpha=final / peak if peak else 0.0)
  if warmup == 0:
    return cosine
  return optax.join_schedules([optax.linear_schedule(start, peak, warmup), cosine], [warmup])


class LarcState(NamedTuple):
  count: jax.Array


def apex_larc(weight_decay: float, trust_coefficient: float = 0.001, eps: float = 1e-8, clip: bool = False,
              learning_rate: optax.ScalarOrSchedule | None = None,
              exclude_bias_and_norm: bool = False) -> optax.GradientTransformation:
  """apex LARC's gradient rescaling, per parameter tensor (weight decay folded in, as apex does).

  If |p| > 0 and |g| > 0:  g <- (g + wd p) * tc |p| / (|g| + wd |p| + eps)   [clip: ratio <= 1 after / lr]
  else: g unchanged (and no weight decay). Momentum and the LR come after this, in the chain.
  exclude_bias_and_norm: 1-d tensors (biases, BatchNorm scales and shifts) get g unchanged, no weight decay
  (solo-learn's LARS, exclude_bias_n_norm; the DCv2 references apply LARC to every tensor).
  """
  if clip and learning_rate is None:
    raise ValueError("LARC clip=True needs the learning rate (apex divides the trust ratio by it)")

  def init_fn(params):
    del params
    return LarcState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params):
    lr = None
    if clip:
      lr = learning_rate(state.count) if callable(learning_rate) else learning_rate

    def one(g, p):
      if exclude_bias_and_norm and p.ndim == 1:
        return g
      g32, p32 = g.astype(jnp.float32), p.astype(jnp.float32)
      p_norm, g_norm = jnp.linalg.norm(p32), jnp.linalg.norm(g32)
      ratio = trust_coefficient * p_norm / (g_norm + weight_decay * p_norm + eps)
      if clip:
        ratio = jnp.minimum(ratio / lr, 1.0)
      apply = (p_norm > 0) & (g_norm > 0)
      return jnp.where(apply, (g32 + weight_decay * p32) * ratio, g32).astype(g.dtype)

    return jax.tree.map(one, updates, params), LarcState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(config, steps_per_epoch: int):
  """(optax transform, schedule) for config.optim.name in larc | lars | sgd."""
  o = config.optim
  schedule = lr_schedule(config, steps_per_epoch)
  if o.name == "larc":
    tx = optax.chain(apex_larc(o.weight_decay, o.trust_coefficient, o.eps, o.clip, schedule, o.exclude_bias_and_norm),
                     optax.trace(decay=o.momentum, nesterov=False),
                     optax.scale_by_learning_rate(schedule))
  elif o.name == "lars":
    tx = optax.lars(schedule, weight_decay=o.weight_decay, trust_coefficient=o.trust_coefficient,
                    eps=o.eps, momentum=o.momentum)
  elif o.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(o.weight_decay),
                     optax.sgd(schedule, momentum=o.momentum))
  else:
    raise ValueError(f"optim.name={o.name!r}: choose larc (apex LARC + SGD, as published), lars (optax.lars) or sgd")
  return tx, schedule
