"""Names and files shared by export and import: our Flax variable paths <-> PyTorch state-dict keys.

Module and parameter names of model/trunk.py and model/head.py mirror torchvision's keys (`layer1_0/conv1` is `layer1.0.conv1`), so
the mapping is a renaming plus transposes (conv HWIO <-> OIHW, Linear [in, out] <-> [out, in]).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

VISSL_PREFIX = ("classy_state_dict", "base_model", "model")


def torch_module(modules: tuple[str, ...]) -> str:
  """('layer1_0', 'downsample_conv', 'conv') -> 'layer1.0.downsample.0' (Conv's inner 'conv' vanishes)."""
  out = []
  for m in modules:
    if m == "conv":
      continue
    m = re.sub(r"^layer(\d+)_(\d+)$", r"layer\1.\2", m)
    out.append({"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(m, m))
  return ".".join(out)


BN_NAMES = {("params", "scale"): "weight", ("params", "bias"): "bias",
             ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def trunk_name(collection: str, path: tuple[str, ...]) -> str:
  if path[-1] == "kernel":
    return torch_module(path[:-1]) + ".weight"
  return torch_module(path[:-1]) + "." + BN_NAMES[(collection, path[-1])]


def flat_paths(tree: Mapping) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update({(k,) + p: x for p, x in flat_paths(v).items()})
    else:
      out[(k,)] = v
  return out


def model_part(variables: Mapping, name: str) -> dict:
  """The trunk's (or head's) {'params', 'batch_stats'}; a bare ResNet's variables are the trunk."""
  params = variables["params"]
  if name == "trunk" and "trunk" not in params:
    return {"params": params, "batch_stats": variables.get("batch_stats", {})}
  return {"params": params[name], "batch_stats": variables.get("batch_stats", {}).get(name, {})}


def trunk_state_dict(variables: Mapping, step: int) -> dict[str, np.ndarray]:
  part = model_part(variables, "trunk")
  sd = {}
  for collection in ("params", "batch_stats"):
    for path, value in flat_paths(part[collection]).items():
      value = np.asarray(value, np.float32)
      if path[-1] == "kernel":             # HWIO -> OIHW
        value = value.transpose(3, 2, 0, 1)
      name = trunk_name(collection, path)
      sd[name] = np.ascontiguousarray(value)
      if name.endswith(".running_mean"):
        sd[name[: -len("running_mean")] + "num_batches_tracked"] = np.asarray(step, np.int64)
  return dict(sorted(sd.items(), key=lambda kv: natural_key(kv[0])))


def natural_key(key: str):
  # layer1.2 before layer1.10, so files list in model order as torchvision's own state dicts do.
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def flatten_state_dict(sd: Mapping, sep: str = ".") -> dict[str, np.ndarray]:
  """Nested dicts -> flat '.'-joined keys; non-array leaves (VISSL's ints, strings) are dropped."""
  out = {}
  for path, v in flat_paths(sd).items():
    if hasattr(v, "shape"):
      out[sep.join(map(str, path))] = v
  return out
