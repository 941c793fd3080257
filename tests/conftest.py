"""Test set-up: 8 virtual CPU devices, so every sharding path runs as it would on an 8-GPU node.

XLA reads the flag once, when the backend starts, so it must be set before anything imports jax.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
