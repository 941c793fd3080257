"""The supervised baseline every DCv2 step figure is compared with: a plain Flax ResNet classifier step.

The network is written the plain Flax way (flax's examples/imagenet style: nn.Conv, nn.BatchNorm with its fast
variance, 'SAME' pooling), independent of our trunk, so a ratio compares us with what a Flax user gets without
this project, as the perf.md anchor (5,653 img/s on one H100) was measured. ResNet-50 has torchvision's
parameter count, 25,557,032.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dcv2_jax.model.trunk import STAGES


def plain_flax_classifier(depth: int, base_width: int, dtype):
  kind, blocks = STAGES[depth]
  expansion = 4 if kind == "bottleneck" else 1

  class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      conv = lambda f, k, s=1: nn.Conv(f, (k, k), (s, s), padding=[(k // 2, k // 2)] * 2, use_bias=False,
                                       dtype=dtype)
      norm = lambda **kw: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                                       **kw)
      x = nn.relu(norm()(conv(base_width, 7, 2)(x.astype(dtype))))
      x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
      for stage, n in enumerate(blocks):
        planes = base_width * 2 ** stage
        for i in range(n):
          stride = 2 if stage > 0 and i == 0 else 1
          shapes = ((planes, 1, 1), (planes, 3, stride), (planes * 4, 1, 1)) if expansion == 4 else \
              ((planes, 3, stride), (planes, 3, 1))
          y = x
          for j, (f, k, s) in enumerate(shapes):
            y = norm(scale_init=nn.initializers.zeros if j == len(shapes) - 1 else nn.initializers.ones)(
                conv(f, k, s)(y))
            y = nn.relu(y) if j < len(shapes) - 1 else y
          if x.shape[-1] != planes * expansion or stride != 1:
            x = norm()(conv(planes * expansion, 1, stride)(x))
          x = nn.relu(x + y)
      x = jnp.mean(x, axis=(1, 2))
      return nn.Dense(1000, dtype=dtype)(x).astype(jnp.float32)

  return Classifier()


def supervised_step(depth: int, base_width: int, dtype):
  """(init, step) of the baseline: init(key, example images) -> state; step(state, images, labels) -> (state,
  loss): cross-entropy on 1000 classes, SGD with momentum."""
  model, tx = plain_flax_classifier(depth, base_width, dtype), optax.sgd(0.1, momentum=0.9)

  def init(key, images):
    variables = model.init(key, images[:2], train=False)
    return variables["params"], variables["batch_stats"], tx.init(variables["params"])

  def step(state, images, labels):
    params, batch_stats, opt_state = state

    def loss_fn(p):
      logits, updated = model.apply({"params": p, "batch_stats": batch_stats}, images, train=True,
                                    mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updated["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

  return init, step
