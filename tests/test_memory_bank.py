"""memory_bank: rows written per step come back with their sample indices; the assignment table."""
import jax.numpy as jnp
import numpy as np

from dcv2_jax import memory_bank


def test_bank_write_rows_and_table():
  steps, b, d, n_examples = 3, 8, 4, 30
  bank = memory_bank.create(2, steps, b, d)
  idx_all = np.arange(steps * b).reshape(steps, b) + 5
  for s in range(steps):
    z = np.stack([np.full((b, d), 100 * k + s, np.float32) for k in range(2)])
    bank = memory_bank.write(bank, s, jnp.asarray(z), jnp.asarray(idx_all[s]))
  z_rows, index = memory_bank.rows(bank)
  # Row r of the k-means view holds the sample whose index is index[r], from the step that wrote it.
  step_of = {int(i): s for s in range(steps) for i in idx_all[s]}
  for r, i in enumerate(np.asarray(index)):
    assert np.all(np.asarray(z_rows)[1, r] == 100 + step_of[int(i)])
  assign = jnp.asarray(np.stack([np.asarray(index) % 7, np.asarray(index) % 5]))
  table = np.asarray(memory_bank.assignment_table(assign, index, n_examples))
  for i in range(n_examples):
    if 5 <= i < 5 + steps * b:
      assert table[0, i] == i % 7 and table[1, i] == i % 5
    else:
      assert table[0, i] == -100 and table[1, i] == -100
