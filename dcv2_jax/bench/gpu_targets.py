"""The GPUs the compile check compiles for, described as XLA describes a device (its GpuTargetConfig), so that
XLA's CUDA compiler runs on a machine without a GPU.

The numbers are what the cards report (CUDA's device properties), as XLA's own target files record them
(openxla/xla, xla/backends/gpu/target_config/specs/{a100_sxm_80,h100_sxm,h200}.txtpb). The CUDA and cuDNN
versions the compiler may assume are those the installed jax CUDA plugin was built with.
"""
from __future__ import annotations

import dataclasses
import importlib

from jax.experimental import topologies

from dcv2_jax.sharding import make_mesh


@dataclasses.dataclass(frozen=True)
class Gpu:
  device_kind: str                        # as jax names the device on that card
  compute_capability: tuple[int, int]
  sm_count: int
  memory_bytes: int                       # what the driver reports as the card's memory
  memory_bandwidth: int                   # bytes/s
  l2_cache_bytes: int
  clock_ghz: float
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int
  fp32_units_per_sm: int


GPUS = {
    "a100-80gb": Gpu("NVIDIA A100-SXM4-80GB", (8, 0), 108, 85_100_068_864, 2_039_040_000_000, 41_943_040, 1.41,
                     167_936, 166_912, 64),
    "h100": Gpu("NVIDIA H100 80GB HBM3", (9, 0), 132, 84_942_979_072, 3_352_320_000_000, 52_428_800, 1.98,
                233_472, 232_448, 128),
    "h200": Gpu("NVIDIA H200", (9, 0), 132, 151_397_597_184, 4_800_000_000_000, 52_428_800, 1.98,
                233_472, 232_448, 128),
}


def toolkit_versions() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
  """((CUDA major, minor, patch), (cuDNN major, minor, patch)) the installed jax CUDA plugin was built with.
  Raises ImportError (with what to install) when there is none."""
  for plugin in ("jax_cuda12_plugin", "jax_cuda13_plugin"):
    try:
      versions = importlib.import_module(f"{plugin}._versions")
    except ImportError:
      continue
    cuda, cudnn = versions.cuda_runtime_build_version(), versions.cudnn_build_version()
    return (cuda // 1000, cuda % 1000 // 10, 0), (cudnn // 10000, cudnn % 10000 // 100, cudnn % 100)
  raise ImportError("compiling for a GPU needs XLA's CUDA compiler: pip install 'jax[cuda12-local]' (the jax CUDA "
                    "plugin without the NVIDIA libraries, about 1 GB; no GPU needed)")


def target_config(gpu: Gpu) -> str:
  """XLA's GpuTargetConfig (text format) of `gpu`; the block and register limits are those of every NVIDIA GPU
  since Volta."""
  (cuda_major, cuda_minor, _), (dnn_major, dnn_minor, dnn_patch) = toolkit_versions()
  major, minor = gpu.compute_capability
  return f"""
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {gpu.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {gpu.sm_count}
  fpus_per_core: {gpu.fp32_units_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {gpu.memory_bandwidth}
  l2_cache_size: {gpu.l2_cache_bytes}
  clock_rate_ghz: {gpu.clock_ghz}
  device_memory_size: {gpu.memory_bytes}
  shared_memory_per_block_optin: {gpu.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {dnn_major} minor: {dnn_minor} patch: {dnn_patch} }}
runtime_version {{ major: {cuda_major} minor: {cuda_minor} patch: 0 }}
device_description_str: "{gpu.device_kind}"
"""


def mesh(gpu_name: str, num_devices: int):
  """A one-axis device mesh of `num_devices` GPUs of one host ('1x1xN': partitions x hosts x devices per host),
  abstract: programs can be lowered and compiled for it, not run."""
  topology = topologies.get_topology_desc(platform="cuda", target_config=target_config(GPUS[gpu_name]),
                                          topology=f"1x1x{num_devices}")
  return make_mesh(topology.devices)
