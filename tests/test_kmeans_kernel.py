"""kmeans_kernel.nearest, the fused assignment kernel: argmax/max of float64 scores (interpreted on CPU), bfloat16
inputs, and a lowering for CUDA that JAX's Triton backend accepts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcv2_jax import kmeans_kernel
from kmeans_helpers import unit


@pytest.mark.parametrize("n,k,d,block_rows,block_k", [(300, 200, 128, 64, 128), (77, 129, 100, 16, 32),
                                                       (5, 3, 7, 64, 128)])
def test_fused_nearest_matches_float64(n, k, d, block_rows, block_k):
  """The fused kernel (interpreted on CPU) gives argmax/max of the float64 scores; ties go to the lowest
  index, also across centroid blocks."""
  rng = np.random.default_rng(10)
  x = rng.normal(size=(n, d)).astype(np.float32)
  c = rng.normal(size=(k, d)).astype(np.float32)
  c[k - 1] = c[min(1, k - 2)]                            # a duplicate in a later block: a tie it must lose
  a, best = kmeans_kernel.nearest(jnp.asarray(x), jnp.asarray(c), block_rows=block_rows, block_k=block_k,
                                  precision=jax.lax.Precision.HIGHEST)
  scores = x.astype(np.float64) @ c.astype(np.float64).T
  np.testing.assert_array_equal(np.asarray(a), scores.argmax(1))
  np.testing.assert_allclose(np.asarray(best), scores.max(1), atol=1e-4)
  with pytest.raises(ValueError, match="block_rows=48"):
    kmeans_kernel.nearest(jnp.asarray(x), jnp.asarray(c), block_rows=48)


def test_fused_nearest_bfloat16_inputs():
  rng = np.random.default_rng(11)
  x = unit(rng.normal(size=(256, 32))).astype(np.float32)
  c = unit(rng.normal(size=(50, 32))).astype(np.float32)
  a, best = kmeans_kernel.nearest(jnp.asarray(x, jnp.bfloat16), jnp.asarray(c))
  xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
  cb = np.asarray(jnp.asarray(c, jnp.bfloat16).astype(jnp.float32), np.float64)
  ref = xb @ cb.T                                        # the bf16-rounded inputs, products summed in fp32+
  np.testing.assert_allclose(np.asarray(best), ref.max(1), atol=1e-5)
  np.testing.assert_array_equal(ref[np.arange(256), np.asarray(a)], ref.max(1))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_nearest_lowers_to_a_triton_kernel_for_cuda(dtype):
  """Without a GPU, lower the kernel for CUDA: JAX's Triton lowering (shapes, primitives, dot precision)
  must accept it, so a GPU run does not fail there. Compiling the Triton IR to PTX needs the GPU."""
  from jax import export
  fn = jax.jit(lambda x, c: kmeans_kernel.nearest(x, c, interpret=False))
  # The GPU the lowering targets (JAX 0.11 reads its compute capability from the mesh's abstract device).
  h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
    exported = export.export(fn, platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        jax.ShapeDtypeStruct((1000, 100), jnp.dtype(dtype)), jax.ShapeDtypeStruct((3000, 100), jnp.float32))
  assert "__gpu$xla.gpu.triton" in exported.mlir_module()
