"""Trunk weights into JAX: from a training workdir, a checkpoint, or a torchvision / SwAV / VISSL file
(`dcv2_jax.load_trunk`), e.g. the published DCv2 checkpoints.
"""
from __future__ import annotations

import os
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from dcv2_jax.model.trunk import ResNet, STAGES, TrunkArch, trunk_apply_fn
from dcv2_jax.run import checkpoint
from dcv2_jax.torch_names import VISSL_PREFIX, flat_paths, flatten_state_dict, model_part, natural_key, trunk_name

# Torch-side trunk keys we knowingly drop on import: the classifier and SwAV/VISSL head weights.
_IGNORED_ON_IMPORT = re.compile(r"^(fc\.|projection_head\.|prototypes\.)|(^|\.)num_batches_tracked$")


def load_state_dict_file(path: str) -> dict[str, np.ndarray]:
  """A .safetensors or torch (.pth/.pt/.tar) file -> flat {name: np.ndarray} (nesting joined by '.')."""
  path = os.fspath(path)
  try:
    if path.endswith(".safetensors"):
      return load_file(path)
    import torch  # pylint: disable=g-import-not-at-top  (late: only .pth files need torch, an optional package)
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except ImportError as e:      # a torch file on a machine without torch (e.g. the GPU image's Python 3.12 line)
    raise ValueError(f"{path}: reading a torch file needs torch ({e}); install it (pip install torch) or use "
                     "a .safetensors file (python -m dcv2_jax.export writes both)") from None
  except Exception as e:  # pylint: disable=broad-except  (safetensors', torch's and pickle's errors alike)
    raise ValueError(f"{path} is not a weights file this tool reads (a .safetensors file or a torch state dict: "
                     f"{type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a state dict, found a {type(obj).__name__}")

  def to_numpy(x):
    if isinstance(x, Mapping):
      return {str(k): to_numpy(v) for k, v in x.items()}
    if isinstance(x, torch.Tensor):
      x = x.detach().cpu()
      return (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).numpy()
    return x
  return flatten_state_dict(to_numpy(obj))


def _strip_prefixes(sd: Mapping) -> dict[str, np.ndarray]:
  """Any supported layout -> torchvision-style names (plus head keys, filtered out later)."""
  sd = flatten_state_dict(sd)
  vissl_trunk = ".".join(VISSL_PREFIX) + ".trunk."
  if any(k.startswith(vissl_trunk) for k in sd):
    sd = {k[len(vissl_trunk):]: v for k, v in sd.items() if k.startswith(vissl_trunk)}
  elif any(k.startswith("state_dict.") for k in sd):   # a SwAV-repo training checkpoint
    sd = {k[len("state_dict."):]: v for k, v in sd.items() if k.startswith("state_dict.")}
  out = {}
  for k, v in sd.items():
    for prefix in ("module.", "_feature_blocks."):
      k = k[len(prefix):] if k.startswith(prefix) else k
    out[k] = v
  return out


def _architecture(names) -> tuple[str, tuple[int, ...]]:
  kind = "bottleneck" if "layer1.0.conv3.weight" in names else "basic"
  counts = []
  for stage in range(1, 5):
    blocks = {int(m.group(1)) for n in names if (m := re.match(rf"layer{stage}\.(\d+)\.", n))}
    counts.append(len(blocks))
  return kind, tuple(counts)


def _summary(title: str, keys: list[str], limit: int = 10) -> str:
  more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
  return f"{title} ({len(keys)}): {', '.join(keys[:limit])}{more}"


def from_torch_state_dict(sd: Mapping, depth: int | None = None):
  """A torchvision / SwAV / VISSL ResNet or ResNeXt state dict -> (depth, width, variables for model.trunk.ResNet).

  See `trunk_from_state_dict`, which also returns the rest of the architecture.
  """
  arch, variables = trunk_from_state_dict(sd, depth)
  return arch.depth, arch.width, variables


def trunk_from_state_dict(sd: Mapping, depth: int | None = None):
  """A torchvision / SwAV / VISSL state dict -> (its TrunkArch, variables).

  Depth comes from the block counts and block kind, width from the stem's channels (64 * width), ResNeXt's
  groups and width per group from the first bottleneck's 3x3 conv ([width, width / groups, 3, 3]), the
  stem from conv1 (7x7: torchvision's; 3x3: the CIFAR stem). A stem that is not a multiple of 64 (small test
  models) is returned as width 1 and base width = stem channels: the network only depends on their
  product. Raises ValueError naming missing / unexpected / mis-shaped keys.
  """
  sd = _strip_prefixes(sd)
  if "conv1.weight" not in sd or np.ndim(sd["conv1.weight"]) != 4:
    raise ValueError("Not a ResNet state dict: no 4-d 'conv1.weight'. " + _summary("Keys found", sorted(sd)))
  kind, counts = _architecture(sd)
  found = [d for d, arch in STAGES.items() if arch == (kind, counts)]
  if depth is not None and found and found[0] != depth:
    raise ValueError(f"Depth mismatch: expected ResNet-{depth}, the state dict is a ResNet-{found[0]} "
                     f"({kind} blocks {counts})")
  # Unknown block counts: compare against the nearest depth of the same kind so the error lists the
  # blocks that are missing or extra rather than just "unknown".
  if depth is None:
    depth = found[0] if found else min(
        (d for d, (k, _) in STAGES.items() if k == kind),
        key=lambda d: sum(abs(a - b) for a, b in zip(STAGES[d][1], counts)))
  channels, _, kernel, _ = np.shape(sd["conv1.weight"])
  width, base_width = (channels // 64, 64) if channels % 64 == 0 else (1, channels)
  groups, width_per_group = 1, 64
  conv2 = np.shape(sd.get("layer1.0.conv2.weight", ()))
  if kind == "bottleneck" and len(conv2) == 4 and conv2[1] != conv2[0]:
    groups = conv2[0] // conv2[1]                 # grouped 3x3: [width, width / groups, 3, 3]
    width_per_group = conv2[1] * 64 // channels
  arch = TrunkArch(depth, width, base_width, groups, width_per_group, "cifar" if kernel == 3 else "imagenet")
  shapes = jax.eval_shape(lambda: ResNet(arch).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.float32),
                                                    train=False))
  expected = {}
  for collection in ("params", "batch_stats"):
    for path, leaf in flat_paths(shapes[collection]).items():
      expected[trunk_name(collection, path)] = (collection, path, leaf.shape)
  name = arch.describe()
  missing = sorted((k for k in expected if k not in sd), key=natural_key)
  unexpected = sorted((k for k in sd if k not in expected and not _IGNORED_ON_IMPORT.search(k)), key=natural_key)
  if missing or unexpected:
    raise ValueError(f"State dict does not match a {name} (width {width}, {kind} blocks {counts}). "
                     + "; ".join(_summary(t, ks) for t, ks in (("Missing", missing), ("Unexpected", unexpected))
                                 if ks))
  variables: dict = {"params": {}, "batch_stats": {}}
  bad = []
  for key, (collection, path, shape) in expected.items():
    value = np.asarray(sd[key], np.float32)
    if path[-1] == "kernel":               # OIHW -> HWIO
      value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    if value.shape != tuple(shape):
      bad.append(f"{key} {tuple(value.shape)} != {tuple(shape)}")
      continue
    node = variables[collection]
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = jnp.asarray(value)
  if bad:
    raise ValueError(f"Shape mismatch against {name} width {width}: " + _summary("Mismatched", bad))
  return arch, variables


def load_trunk(path: str):
  """A workdir, checkpoint or exported torchvision/SwAV/VISSL file -> (apply_fn, trunk variables).

  `apply_fn(variables, images)`: float32 NHWC normalised images -> pooled [B, feature_dim] features,
  BatchNorm in eval mode (running statistics). `variables` = {'params', 'batch_stats'} of models.ResNet,
  ready for evaluation or fine-tuning.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    config, variables, _, _ = checkpoint.restore_model_variables(path)
    return trunk_apply_fn(TrunkArch.from_config(config.model)), model_part(variables, "trunk")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file or directory")
  arch, variables = trunk_from_state_dict(load_state_dict_file(path))
  return trunk_apply_fn(arch), variables
