"""conventions.py: l2_normalize is torch.nn.functional.normalize (each row over max(its norm, eps)), checked against
float64 numpy and torch; steps_per_epoch counts whole global batches only."""
import jax.numpy as jnp
import numpy as np
import pytest

from dcv2_jax.conventions import l2_normalize, steps_per_epoch


def test_l2_normalize_divides_each_row_of_the_last_axis_by_its_norm():
  rng = np.random.default_rng(0)
  # Rows of very different scales, in a 3-d array: only the last axis is normalised.
  x = (rng.normal(size=(3, 5, 7)) * np.array([1e-3, 1.0, 1e3])[:, None, None]).astype(np.float32)
  got = np.asarray(l2_normalize(jnp.asarray(x)))
  x64 = x.astype(np.float64)
  want = x64 / np.sqrt((x64 * x64).sum(axis=-1, keepdims=True))
  assert got.shape == x.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.sqrt((got.astype(np.float64) ** 2).sum(-1)), 1.0, rtol=1e-6)


def test_l2_normalize_divides_rows_shorter_than_eps_by_eps():
  """A zero row stays zero (no NaN); a row shorter than eps is divided by eps, not scaled up to unit length."""
  x = np.zeros((4, 3), np.float32)
  x[1] = [3e-13, 4e-13, 0.0]                # norm 5e-13 < the default eps 1e-12
  x[2] = [0.03, 0.04, 0.0]                  # norm 0.05: below eps=0.1 in the second call, above the default
  x[3] = [3.0, 0.0, -4.0]
  got = np.asarray(l2_normalize(jnp.asarray(x)))
  assert np.all(np.isfinite(got))
  np.testing.assert_array_equal(got[0], 0.0)
  np.testing.assert_allclose(got[1], x[1].astype(np.float64) / 1e-12, rtol=1e-6)
  np.testing.assert_allclose(got[2:], x[2:].astype(np.float64) / [[0.05], [5.0]], rtol=1e-6)
  got = np.asarray(l2_normalize(jnp.asarray(x), eps=0.1))
  np.testing.assert_allclose(got[2], x[2].astype(np.float64) / 0.1, rtol=1e-6)
  np.testing.assert_allclose(got[3], x[3].astype(np.float64) / 5.0, rtol=1e-6)


@pytest.mark.torch
@pytest.mark.parametrize("eps", [1e-12, 0.1])
def test_l2_normalize_equals_torch_normalize(eps):
  import torch
  rng = np.random.default_rng(1)
  x = rng.normal(size=(6, 9)).astype(np.float32)
  x[0] = 0.0
  x[1] *= 1e-14                             # shorter than the default eps
  x[2] *= 0.01                              # shorter than eps=0.1
  want = torch.nn.functional.normalize(torch.from_numpy(x.astype(np.float64)), dim=-1, eps=eps).numpy()
  np.testing.assert_allclose(np.asarray(l2_normalize(jnp.asarray(x), eps=eps)), want, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("num_examples,global_batch", [(1438, 64), (1280, 64), (63, 64), (64, 64), (1_281_167, 4096),
                                                       (10, 0)])
def test_steps_per_epoch_drops_the_last_partial_batch(num_examples, global_batch):
  # The batches a drop-last loader yields, counted one by one.
  whole = 0 if global_batch == 0 else sum(1 for start in range(0, num_examples, global_batch)
                                          if start + global_batch <= num_examples)
  assert steps_per_epoch(num_examples, global_batch) == whole


def test_l2_normalize_has_a_finite_gradient_at_a_zero_row():
  """A zero row (an embedding that collapsed to 0) must not turn the step's gradients into NaN: torch's
  normalize gives it a finite gradient; so does ours (jnp.linalg.norm's gradient at 0 is NaN)."""
  import jax
  import jax.numpy as jnp
  g = jax.grad(lambda x: jnp.sum(l2_normalize(x) * jnp.arange(1.0, 4.0)))(jnp.zeros((2, 3)))
  assert np.isfinite(np.asarray(g)).all()
