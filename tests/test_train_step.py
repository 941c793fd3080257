"""The sharded train step: 8 devices == 1 device, bank writes, init pass, fp16 overflow handling."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcv2_jax import augment, device_crops
from dcv2_jax.config import base_config
from dcv2_jax.data import transforms
from dcv2_jax.loss import dcv2_loss
from dcv2_jax.sharding import local_batch_to_global, make_mesh
from dcv2_jax.train_step import jit_epoch_steps, make_spec

B, STEPS, N = 16, 3, 64


def tiny_config(dtype="float32"):
  c = base_config()
  c.model.depth, c.model.base_width, c.model.head_dims = 18, 8, (32, 16)
  c.model.dtype = dtype
  c.loss.num_clusters = (10, 10, 10)
  c.data.crops = ((32, 2, 0.5, 1.0), (16, 2, 0.2, 0.5))
  c.batch_size, c.num_epochs = B, 2
  c.optim.warmup_epochs = 1
  return c


@functools.lru_cache(maxsize=None)
def compiled(num_devices: int, dtype: str = "float32", loss_scale: float = 2.0 ** 15):
  """One compilation per device count, shared by the tests (CPU compiles dominate their time)."""
  c = tiny_config(dtype)
  c.optim.loss_scale = loss_scale
  devices = jax.devices()[:num_devices]
  mesh = make_mesh(devices)
  spec = make_spec(c, N, STEPS, mesh)
  return mesh, spec, jit_epoch_steps(spec, mesh)


def random_batch(rng, step=0, num_groups=2):
  crops = [rng.integers(0, 256, (B, 2, 32, 32, 3), dtype=np.uint8),
           rng.integers(0, 256, (B, 2, 16, 16, 3), dtype=np.uint8)]
  return {"crops": crops[:num_groups], "index": (np.arange(B) + step * B).astype(np.int32),
          "label": np.zeros(B, np.int32)}


def fresh_state(comp, seed=0):
  state = comp.init(jax.random.key(0))
  rng = np.random.default_rng(seed)
  cents = rng.normal(size=state.centroids.shape).astype(np.float32)
  cents /= np.linalg.norm(cents, axis=-1, keepdims=True)
  table = rng.integers(0, 10, state.table.shape).astype(np.int32)
  table[:, ::5] = -100
  return state.replace(centroids=jax.device_put(cents, state.centroids.sharding),
                       table=jax.device_put(table, state.table.sharding))


def run_steps(num_devices, batches, state=None):
  mesh, spec, comp = compiled(num_devices)
  state = fresh_state(comp) if state is None else state
  metrics = []
  for b in batches:
    state, m, control = comp.train(state, local_batch_to_global(b, mesh))
    metrics.append({**jax.device_get(m), "grads_finite": bool(control.grads_finite)})
  return state, metrics


def test_eight_devices_equal_one_device():
  rng = np.random.default_rng(0)
  batches = [random_batch(rng, s) for s in range(2)]
  s8, m8 = run_steps(8, batches)
  s1, m1 = run_steps(1, batches)
  for a, b in zip(m8, m1):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  p8, p1 = jax.tree.leaves(jax.device_get(s8.params)), jax.tree.leaves(jax.device_get(s1.params))
  for a, b in zip(p8, p1):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(jax.device_get(s8.batch_stats)), jax.tree.leaves(jax.device_get(s1.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(s8.bank.z), np.asarray(s1.bank.z), atol=1e-5)
  assert len(s8.bank.z.sharding.device_set) == 8
  p0 = jax.tree.leaves(jax.device_get(fresh_state(compiled(1)[2]).params))
  assert max(np.abs(a - b).max() for a, b in zip(p1, p0)) > 0     # the step did change the weights


def test_bank_holds_pre_update_z_of_crops_for_mb():
  rng = np.random.default_rng(1)
  batches = [random_batch(rng, s) for s in range(2)]
  s_after_0, _ = run_steps(8, batches[:1])
  before = jax.device_get((s_after_0.params, s_after_0.batch_stats))
  state, metrics = run_steps(8, batches[1:], state=s_after_0)
  assert all(np.isfinite(m["loss"]) for m in metrics)
  idx = np.asarray(state.bank.index)
  np.testing.assert_array_equal(idx[0], batches[0]["index"])
  np.testing.assert_array_equal(idx[1], batches[1]["index"])
  assert np.all(idx[2] == -1)                                  # slot row 2 not written yet
  # Slot row 1 = forward of batch 1 with the weights after step 0 (pre-update for step 1).
  spec = compiled(8)[1]
  crops = augment.augment_crops([jnp.asarray(x) for x in batches[1]["crops"]], jnp.asarray(batches[1]["index"]),
                                jnp.asarray(0), spec.augment_cfg, seed=spec.seed, out_dtype=spec.compute_dtype)
  z, _ = spec.model.apply({"params": before[0], "batch_stats": before[1]}, crops, train=True,
                          mutable=["batch_stats"])
  bank = np.asarray(state.bank.z)
  np.testing.assert_allclose(bank[:, 1], np.swapaxes(np.asarray(z)[:, :2], 0, 1), atol=2e-5)
  np.testing.assert_allclose(np.linalg.norm(bank[:, :2], axis=-1), 1.0, atol=1e-5)


def test_skipped_samples_are_ignored():
  b = random_batch(np.random.default_rng(2))
  b["index"][:] = -1
  _, metrics = run_steps(8, [b])
  assert metrics[0]["loss"] == 0.0 and metrics[0]["skipped"] == B


def test_bank_init_pass_then_kmeans_then_step():
  rng = np.random.default_rng(4)
  mesh, spec, comp = compiled(8)
  state = comp.init(jax.random.key(0))
  for s in range(STEPS):
    state, skipped = comp.bank_init(state, local_batch_to_global(random_batch(rng, s), mesh), jnp.asarray(s))
    assert int(skipped) == 0
  idx = np.asarray(state.bank.index)
  np.testing.assert_array_equal(np.sort(idx.ravel()), np.arange(STEPS * B))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(state.bank.z), axis=-1), 1.0, atol=1e-5)
  # The fused assignment kernel (loss.kmeans_assign=pallas, run per device) gives the same clustering.
  c = tiny_config()
  c.loss.kmeans_assign = "pallas"
  fused = jit_epoch_steps(make_spec(c, N, STEPS, mesh), mesh)
  fused_state, fused_sizes = fused.kmeans(jax.tree.map(jnp.copy, state), jax.random.key(1))
  state, sizes = comp.kmeans(state, jax.random.key(1))
  table = np.asarray(state.table)
  assert np.all(table[:, :STEPS * B] >= 0) and np.all(table[:, STEPS * B:] == -100)
  assert np.asarray(sizes).sum(axis=1).tolist() == [STEPS * B] * 3
  np.testing.assert_array_equal(np.asarray(fused_state.table), table)
  np.testing.assert_array_equal(np.asarray(fused_sizes), np.asarray(sizes))
  np.testing.assert_allclose(np.asarray(fused_state.centroids), np.asarray(state.centroids), atol=1e-5)
  state, m, _ = comp.train(state, local_batch_to_global(random_batch(rng, 0), mesh))
  assert np.isfinite(float(m["loss"])) and float(m["loss"]) > 0


def test_fp16_overflow_skips_update_and_halves_scale():
  rng = np.random.default_rng(3)
  mesh, spec, comp = compiled(8, "float16", 3e38)      # the scaled loss overflows -> inf gradients
  state = fresh_state(comp)
  before = jax.device_get(state.params)
  state, m, control = comp.train(state, local_batch_to_global(random_batch(rng), mesh))
  assert not bool(control.grads_finite)
  assert float(state.loss_scale.scale) == pytest.approx(1.5e38, rel=1e-3)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_array_equal(a, b)
  # The skipped step still counts for the schedule: the optimizer's step counters advanced.
  counts = [int(x) for x in jax.tree.leaves(jax.device_get(state.opt_state)) if np.asarray(x).dtype.kind == "i"]
  assert counts and all(c == 1 for c in counts)
  for s in (1, 2):
    state, m, _ = comp.train(state, local_batch_to_global(random_batch(rng, s), mesh))
  assert np.isfinite(m["loss"]) and float(state.loss_scale.scale) < 1e38


def test_non_finite_embeddings_are_not_stored_in_the_bank():
  mesh, spec, comp = compiled(8)
  state = fresh_state(comp)
  head = jax.device_get(state.params)
  head["head"]["linear1"]["bias"] = np.full_like(head["head"]["linear1"]["bias"], np.nan)
  state = state.replace(params=jax.device_put(head, state.centroids.sharding))
  state, m, _ = comp.train(state, local_batch_to_global(random_batch(np.random.default_rng(5)), mesh))
  assert not np.isfinite(m["loss"])
  assert np.all(np.asarray(state.bank.index)[0] == -1)      # rows with NaN z are stored as empty


def test_a_batch_with_bad_rows_equals_the_batch_without_them():
  """Undecodable samples (index -1, zero crops) take no part: the BatchNorm statistics and the loss are those
  of the same batch with those samples left out."""
  c = tiny_config()
  c.data.crops = ((16, 2, 0.2, 1.0),)
  spec = make_spec(c, N, STEPS, make_mesh(jax.devices()[:1]))
  variables = jax.jit(lambda k: spec.model.init(k, [jnp.zeros((1, 1, 16, 16, 3))], train=True))(jax.random.key(0))
  rng = np.random.default_rng(6)
  crops = rng.integers(0, 256, (B, 2, 16, 16, 3), dtype=np.uint8)
  index = np.arange(B, dtype=np.int32)
  bad = np.zeros(B, bool)
  bad[[2, 9, 10]] = True
  index[bad], crops[bad] = -1, 0
  table = jnp.asarray(rng.integers(0, 10, (3, N)), jnp.int32)
  centroids = jnp.asarray(rng.normal(size=(3, 10, 16)), jnp.float32)
  centroids /= jnp.linalg.norm(centroids, axis=-1, keepdims=True)

  @jax.jit
  def loss_and_stats(crops, index):
    x = augment.augment_crops([crops], index, jnp.asarray(0), spec.augment_cfg, seed=spec.seed,
                              out_dtype=spec.compute_dtype)
    z, mutated = spec.model.apply(variables, x, train=True, mask=index >= 0, mutable=["batch_stats"])
    targets = jnp.take(table, jnp.where(index >= 0, index, N), axis=1, mode="fill", fill_value=-100)
    return dcv2_loss(jnp.swapaxes(z, 0, 1), centroids, targets, spec.temperature), mutated["batch_stats"]

  with_bad = loss_and_stats(jnp.asarray(crops), jnp.asarray(index))
  without = loss_and_stats(jnp.asarray(crops[~bad]), jnp.asarray(index[~bad]))
  np.testing.assert_allclose(float(with_bad[0]), float(without[0]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(with_bad[1]), jax.tree.leaves(without[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  # Without the mask, the zero rows would have shifted the statistics: the test can tell.
  x = augment.augment_crops([jnp.asarray(crops)], jnp.asarray(index), jnp.asarray(0), spec.augment_cfg,
                            seed=spec.seed, out_dtype=spec.compute_dtype)
  _, unmasked = spec.model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
      jax.tree.leaves(unmasked["batch_stats"]), jax.tree.leaves(without[1]))) > 1e-3


@pytest.mark.parametrize("precision", ["default", "highest"])
def test_model_matmul_precision_reaches_every_conv_and_dense(precision):
  """model.matmul_precision=highest (the SwAV repo's true-float32 V100 runs): every convolution and matmul of
  trunk and head carries HIGHEST, so GPUs do not silently use TF32."""
  c = tiny_config()
  c.model.matmul_precision = precision
  c.model.groups, c.model.width_per_group, c.model.depth = 1, 64, 18
  spec = make_spec(c, N, STEPS, make_mesh(jax.devices()[:1]))
  x = [jnp.zeros((2, 1, 16, 16, 3))]
  variables = jax.eval_shape(lambda: spec.model.init(jax.random.key(0), x, train=True))
  text = jax.jit(lambda v, x: spec.model.apply(v, x, train=False)).lower(variables, x).as_text()
  ops = text.count("stablehlo.convolution") + text.count("stablehlo.dot_general")
  assert ops >= 21                                 # 20 convs of ResNet-18 + the head's Linear layers
  marked = text.count("precision = [HIGHEST, HIGHEST]") + text.count(
      "precision_config = [#stablehlo<precision HIGHEST>, #stablehlo<precision HIGHEST>]")
  assert marked == (ops if precision == "highest" else 0)


def device_crop_batch(rng, step=0, canvas=48):
  """A device-crop batch (data.crops_on=device) for tiny_config's crops: images of random sizes on the canvas,
  their crop boxes drawn as the pipeline draws them."""
  crops = tiny_config().data.crops
  image = np.zeros((B, canvas, canvas, 3), np.uint8)
  sizes = rng.integers(20, canvas + 1, (B, 2)).astype(np.int32)
  boxes = np.zeros((B, 4, 4), np.float32)
  for row, (h, w) in enumerate(sizes):
    image[row, :h, :w] = rng.integers(0, 256, (h, w, 3))
    boxes[row] = transforms.crop_boxes(rng, int(h), int(w), crops)
  return {"image": image, "image_size": sizes, "boxes": boxes, "index": (np.arange(B) + step * B).astype(np.int32),
          "label": np.zeros(B, np.int32)}


def test_device_crops_step_is_the_step_on_those_crops():
  """data.crops_on=device: the step cuts the crops itself (device_crops.py), group by group in order, and then is
  the host-crop step: on 8 devices, the same loss, weights and bank as the step given those crops (unrounded; what
  rounding to 8 bits moves is device_crops' parity with PIL, tests/test_device_crops.py). The bank's initial pass
  runs on device-crop batches too."""
  rng = np.random.default_rng(9)
  mesh, spec, comp = compiled(8)
  dev = device_crop_batch(rng)
  cut = device_crops.cut({k: jnp.asarray(dev[k]) for k in ("image", "image_size", "boxes")}, spec.crop_groups)
  host = {"crops": [np.asarray(x) for x in cut], "index": dev["index"], "label": dev["label"]}
  (s_dev, (m_dev,)), (s_host, (m_host,)) = run_steps(8, [dev]), run_steps(8, [host])
  np.testing.assert_allclose(m_dev["loss"], m_host["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(jax.device_get(s_dev.params)), jax.tree.leaves(jax.device_get(s_host.params))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(s_dev.bank.z), np.asarray(s_host.bank.z), atol=1e-5)
  state = comp.init(jax.random.key(0))
  state, _ = comp.bank_init(state, local_batch_to_global(dev, mesh), jnp.asarray(0))
  np.testing.assert_array_equal(np.asarray(state.bank.index)[0], dev["index"])
  np.testing.assert_allclose(np.linalg.norm(np.asarray(state.bank.z)[:, 0], axis=-1), 1.0, atol=1e-5)
