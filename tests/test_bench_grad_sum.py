"""bench grad_sum: the devices' gradients summed in float32 against bfloat16 sums."""
from dcv2_jax import bench


def test_grad_sum_bench_shows_bfloat16_sums_lose_what_float32_sums_keep(capsys):
  """The measurement behind model.grad_reduce_dtype=float32: the devices' gradients of the real DCv2 loss summed in
  float32 are exact to float32 rounding; summed in bfloat16 (ring or tree) they are off by a fraction of a percent."""
  (r,) = bench.main(["grad_sum", "--devices", "8"])
  err = r["relative_error"]
  assert err["float32"]["max"] < 1e-6
  for way in ("bf16_ring", "bf16_tree"):
    assert 1e-4 < err[way]["all"] < 0.05 and err[way]["median"] > 1e3 * err["float32"]["max"]
  assert '"bench": "grad_sum"' in capsys.readouterr().out
