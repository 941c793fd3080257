"""The jitted functions of an epoch, bound to the run's spec and device mesh.

    steps = jit_epoch_steps(spec, mesh)
    state = steps.init(key)                                # fresh TrainState, sharded
    state = steps.bank_init(state, batch, slot)            # memory bank's initial pass (fresh runs)
    state, sizes = steps.kmeans(state, key)                # start of every epoch: kmeans.cluster_heads
    state, metrics, control = steps.train(state, batch)    # every batch: train_step.train_step

Each is one `jax.jit` over the mesh with global arrays: parameters, optimizer state, centroids and the
assignment table replicated; batch and memory bank split on the data axis; the state donated (the bank
is updated in place). XLA inserts the collectives (BatchNorm statistics, gradient all-reduce, k-means
sums). `distributed.jit`: in a multi-process run each starts together on every process.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax

from dcv2_jax import distributed, kmeans
from dcv2_jax.sharding import batch_sharded, replicated
from dcv2_jax.train_state import StepSpec, TrainState, init_state, state_shardings
from dcv2_jax.train_step import bank_init_step, train_step


def kmeans_step(spec: StepSpec, mesh, state: TrainState, key):
  """k-means of every head on the bank -> the state with new centroids and table, and the cluster sizes."""
  centroids, table, sizes = kmeans.cluster_heads(key, state.bank, spec.num_clusters, spec.kmeans_iters,
                                                 spec.num_examples, spec.kmeans, mesh)
  return state.replace(centroids=centroids, table=table), sizes


@dataclasses.dataclass(frozen=True)
class EpochSteps:
  init: Callable          # key -> TrainState
  bank_init: Callable     # (state, batch, slot) -> state
  kmeans: Callable        # (state, key) -> (state, cluster sizes [H, K])
  train: Callable         # (state, batch) -> (state, metrics, StepControl)
  member_scores: Callable  # state -> (index, cluster, score) of every bank row in head 0 (cluster pictures)
  state_sharding: TrainState


def jit_epoch_steps(spec: StepSpec, mesh) -> EpochSteps:
  rep, data = replicated(mesh), batch_sharded(mesh)
  shape = jax.eval_shape(functools.partial(init_state, spec), jax.random.key(0))
  ss = state_shardings(shape, mesh)
  jit = distributed.jit
  return EpochSteps(
      init=jit(functools.partial(init_state, spec), out_shardings=ss),
      bank_init=jit(functools.partial(bank_init_step, spec), in_shardings=(ss, data, rep), out_shardings=ss,
                    donate_argnums=0),
      kmeans=jit(functools.partial(kmeans_step, spec, mesh), in_shardings=(ss, rep), out_shardings=(ss, rep),
                 donate_argnums=0),
      train=jit(functools.partial(train_step, spec), in_shardings=(ss, data), out_shardings=(ss, rep, rep),
                donate_argnums=0),
      member_scores=jit(lambda s: kmeans.member_scores(s.bank, s.centroids, s.table), in_shardings=(ss,),
                        out_shardings=rep),
      state_sharding=ss)
