"""Test set-up: 8 virtual CPU devices, so every sharding path runs as it would on an 8-GPU node.

XLA reads the flag once, when the backend starts, so it must be set before anything imports jax.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)

# One persistent compilation cache for the whole test session, subprocesses included: the trainer tests
# start train.py several times with the same programs, and CPU compilation dominates their time.
_CACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), "dcv2_jax_test_xla_cache")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
