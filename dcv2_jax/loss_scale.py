"""Dynamic loss scaling for float16 compute (bfloat16 and float32 need none).

Same policy as apex/torch AMP: scale the loss, unscale the gradients; on a non-finite gradient skip the
update and halve the scale; after `period` finite steps in a row double it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct


@dataclasses.dataclass(frozen=True)
class Policy:
  """optim.loss_scale and optim.loss_scale_period."""
  initial: float = 2.0 ** 15
  period: int = 2000


@struct.dataclass
class LossScale:
  scale: jax.Array         # float32 scalar (1.0 and constant when not float16)
  good_steps: jax.Array    # int32 scalar

  @classmethod
  def create(cls, initial: float) -> "LossScale":
    return cls(jnp.asarray(initial, jnp.float32), jnp.zeros([], jnp.int32))


def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def adjust(ls: LossScale, finite, period: int) -> LossScale:
  grow = finite & (ls.good_steps + 1 >= period)
  scale = jnp.where(finite, jnp.where(grow, ls.scale * 2, ls.scale), jnp.maximum(ls.scale / 2, 1.0))
  good = jnp.where(finite & ~grow, ls.good_steps + 1, 0)
  return LossScale(scale, good.astype(jnp.int32))
