"""The quick linear probe: a Linear layer trained on pre-extracted (frozen) features, and its top-k accuracy.

The protocol's Linear layer, optimizer and schedule (protocol.py), on features extracted once instead of
augmented crops: minutes instead of hours on ImageNet, a little below the published numbers
(linear_on_crops.py is the published protocol). Each epoch is one jitted scan over a random permutation
(the last partial batch is dropped).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcv2_jax.evaluation.protocol import lr_at_epoch, sgd_without_lr


def init_linear(key, feature_dim: int, num_classes: int) -> dict:
  """The SwAV repo's eval_linear init: weight N(0, 0.01), bias 0."""
  return {"kernel": 0.01 * jax.random.normal(key, (feature_dim, num_classes), jnp.float32),
          "bias": jnp.zeros((num_classes,), jnp.float32)}


def _logits(params, x, mu, sd):
  return ((x - mu) / sd) @ params["kernel"] + params["bias"]


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def _top_k(params, x, mu, sd, *, k, chunk):
  # lax.map over row chunks: logits never exceed [chunk, C] (1.28M x 1000 would be 5 GB).
  xs = x.reshape(-1, chunk, x.shape[-1])
  return jax.lax.map(lambda c: jax.lax.top_k(_logits(params, c, mu, sd), k)[1], xs).reshape(-1, k)


def top_k_accuracy(params, x, y, k: int, mu=0.0, sd=1.0, chunk: int = 4096) -> tuple[float, float]:
  """(top-1, top-k) accuracy of the Linear layer `params` on features x [n, F] (standardized by mu, sd)."""
  n = x.shape[0]
  chunk = min(chunk, n)
  n_pad = -(-n // chunk) * chunk
  xp = jnp.pad(jnp.asarray(x), ((0, n_pad - n), (0, 0)))
  top = np.asarray(_top_k(params, xp, jnp.asarray(mu, jnp.float32), jnp.asarray(sd, jnp.float32), k=k,
                          chunk=chunk))[:n]
  y = np.asarray(y)
  return float(np.mean(top[:, 0] == y)), float(np.mean((top == y[:, None]).any(axis=1)))


def linear_probe(train_feats, train_labels, test_feats, test_labels, num_classes: int, protocol) -> dict:
  """Train Linear(F, num_classes) on frozen features with `protocol`'s settings; test/train accuracy.

  protocol: epochs, batch_size, lr / final_lr (cosine per epoch), weight_decay, momentum, nesterov, seed and
  standardize (zero mean / unit variance per feature from train-set statistics). Mean cross-entropy.
  Features live on one device: fine up to ImageNet x 2048 (10 GB) on an 80 GB GPU.
  """
  x = jnp.asarray(np.asarray(train_feats, np.float32))
  y = jnp.asarray(np.asarray(train_labels, np.int32))
  n, dim = x.shape
  if protocol.standardize:
    mu, sd = jnp.mean(x, axis=0), jnp.std(x, axis=0) + 1e-6
  else:
    mu, sd = jnp.zeros((dim,), jnp.float32), jnp.ones((dim,), jnp.float32)
  bs = min(int(protocol.batch_size), n)
  steps = n // bs
  tx = sgd_without_lr(protocol)
  key, init_key = jax.random.split(jax.random.PRNGKey(protocol.seed))
  params = init_linear(init_key, dim, num_classes)
  opt_state = tx.init(params)

  def loss_fn(params, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(_logits(params, xb, mu, sd), yb).mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def run_epoch(params, opt_state, key, epoch, x, y):
    perm = jax.random.permutation(key, n)[:steps * bs].reshape(steps, bs)
    lr = lr_at_epoch(protocol, epoch)

    def step(carry, idx):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (jax.tree.map(lambda p, u: p - lr * u, params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), perm)
    return params, opt_state, losses.mean()

  loss = jnp.nan
  for epoch in range(int(protocol.epochs)):
    params, opt_state, loss = run_epoch(params, opt_state, jax.random.fold_in(key, epoch), jnp.int32(epoch), x, y)
  top1, top5 = top_k_accuracy(params, np.asarray(test_feats, np.float32), test_labels, min(5, num_classes), mu, sd)
  train_top1, _ = top_k_accuracy(params, x, train_labels, 1, mu, sd)
  return dict(accuracy=top1, top5=top5, train_accuracy=train_top1, final_loss=float(loss),
              epochs=int(protocol.epochs), steps=int(steps * protocol.epochs))
