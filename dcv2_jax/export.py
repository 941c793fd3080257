"""Weight export to PyTorch layouts, and import of PyTorch ResNet weights into JAX.

  python -m dcv2_jax.export --workdir W --format {torchvision,swav,vissl} --out FILE(.pth|.safetensors)

Formats (see docs/export.md):
  torchvision  trunk only, torchvision's ResNet key names; loads into torchvision.models.resnetXX().
  swav         the SwAV/DCv2 repo release layout: `module.` + trunk keys, `module.projection_head.{i}.*`
               and `module.prototypes.prototypes{h}.weight` [K, D] (the k-means centroids of head h).
  vissl        VISSL's checkpoint nesting: classy_state_dict.base_model.model.{trunk,heads}, trunk keys
               `_feature_blocks.<torchvision name>`, heads as VISSL's swav_head (`0.projection_head.*`).

Conversion functions are pure (pytrees of arrays in, {name: np.ndarray} out). Torch is imported only to
read or write .pth files, so the .safetensors path works where torch is not installed.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
from typing import Any, Mapping

import numpy as np

FORMATS = ("torchvision", "swav", "vissl")
VISSL_PREFIX = ("classy_state_dict", "base_model", "model")
# Torch-side trunk keys we knowingly drop on import: the classifier and SwAV/VISSL head weights.
_IGNORED_ON_IMPORT = re.compile(r"^(fc\.|projection_head\.|prototypes\.)|(^|\.)num_batches_tracked$")


# ----------------------------------------------------------------------------------------------------
# Flax path <-> torch name
# ----------------------------------------------------------------------------------------------------

def _torch_module(modules: tuple[str, ...]) -> str:
  """('layer1_0', 'downsample_conv', 'conv') -> 'layer1.0.downsample.0' (Conv's inner 'conv' vanishes)."""
  out = []
  for m in modules:
    if m == "conv":
      continue
    m = re.sub(r"^layer(\d+)_(\d+)$", r"layer\1.\2", m)
    out.append({"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(m, m))
  return ".".join(out)


_BN_NAMES = {("params", "scale"): "weight", ("params", "bias"): "bias",
             ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def _trunk_name(collection: str, path: tuple[str, ...]) -> str:
  if path[-1] == "kernel":
    return _torch_module(path[:-1]) + ".weight"
  return _torch_module(path[:-1]) + "." + _BN_NAMES[(collection, path[-1])]


def _flat(tree: Mapping) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update({(k,) + p: x for p, x in _flat(v).items()})
    else:
      out[(k,)] = v
  return out


def _part(variables: Mapping, name: str) -> dict:
  """The trunk's (or head's) {'params', 'batch_stats'}; a bare ResNet's variables are the trunk."""
  params = variables["params"]
  if name == "trunk" and "trunk" not in params:
    return {"params": params, "batch_stats": variables.get("batch_stats", {})}
  return {"params": params[name], "batch_stats": variables.get("batch_stats", {}).get(name, {})}


def _trunk_state_dict(variables: Mapping, step: int) -> dict[str, np.ndarray]:
  part = _part(variables, "trunk")
  sd = {}
  for collection in ("params", "batch_stats"):
    for path, value in _flat(part[collection]).items():
      value = np.asarray(value, np.float32)
      if path[-1] == "kernel":             # HWIO -> OIHW
        value = value.transpose(3, 2, 0, 1)
      name = _trunk_name(collection, path)
      sd[name] = np.ascontiguousarray(value)
      if name.endswith(".running_mean"):
        sd[name[: -len("running_mean")] + "num_batches_tracked"] = np.asarray(step, np.int64)
  return dict(sorted(sd.items(), key=lambda kv: _natural(kv[0])))


def _natural(key: str):
  # layer1.2 before layer1.10, so files list in model order as torchvision's own state dicts do.
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _head_state_dict(variables: Mapping, config, step: int) -> dict[str, np.ndarray]:
  """Our ProjectionHead as PyTorch's nn.Sequential(Linear, [BN], [ReLU], ..., Linear) indices."""
  part = _part(variables, "head")
  m = config.model
  params, stats = part["params"], part["batch_stats"]
  sd, idx = {}, 0
  for i in range(len(m.head_dims)):
    lin = params[f"linear{i}"]
    sd[f"{idx}.weight"] = np.ascontiguousarray(np.asarray(lin["kernel"], np.float32).T)  # [in,out] -> [out,in]
    sd[f"{idx}.bias"] = np.asarray(lin["bias"], np.float32)
    idx += 1
    if i == len(m.head_dims) - 1:
      break
    if m.head_bn:
      bn, st = params[f"bn{i}"], stats[f"bn{i}"]
      for k, v in (("weight", bn["scale"]), ("bias", bn["bias"]), ("running_mean", st["mean"]),
                   ("running_var", st["var"])):
        sd[f"{idx}.{k}"] = np.asarray(v, np.float32)
      sd[f"{idx}.num_batches_tracked"] = np.asarray(step, np.int64)
      idx += 1
    if m.head_relu:
      idx += 1                           # nn.ReLU has no weights but takes a Sequential index
  return sd


def _prototypes(centroids) -> dict[str, np.ndarray]:
  if centroids is None:
    return {}
  c = np.asarray(centroids, np.float32)
  if c.ndim != 3:
    raise ValueError(f"centroids must be [heads, K, D], got shape {c.shape}")
  # nn.Linear(D, K, bias=False).weight is [K, D]: row k is centroid k, so logits = z @ W^T as in training.
  return {f"prototypes{h}.weight": np.ascontiguousarray(c[h]) for h in range(c.shape[0])}


# ----------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------

def to_torchvision(variables: Mapping, config, step: int = 0) -> dict[str, np.ndarray]:
  """Trunk as a torchvision ResNet state dict (no `fc`): load with `load_state_dict(sd, strict=False)`.

  `variables` are a DCv2Model's or a bare ResNet's {'params', 'batch_stats'}; `step` becomes
  num_batches_tracked (PyTorch only reads it when BN momentum is None).
  """
  m = config.model
  stem = np.shape(_part(variables, "trunk")["params"]["conv1"]["conv"]["kernel"])[-1]
  if m.width != 1:
    raise ValueError(f"A width-{m.width} ResNet-{m.depth} (SwAV's resnet{m.depth}w{m.width}) has no torchvision "
                     f"equivalent (torchvision's wide_resnet multiplies only the bottleneck's inner width); "
                     f"use --format swav, which dcv2_jax.load_trunk and the SwAV repo's models load")
  if stem != 64:
    raise ValueError(f"This ResNet's stem has {stem} channels (model.base_width={m.base_width}); torchvision "
                     f"ResNets have 64. Use --format swav, which dcv2_jax.load_trunk loads")
  return _trunk_state_dict(variables, step)


def to_swav(variables: Mapping, centroids, config, step: int = 0) -> dict[str, np.ndarray]:
  """SwAV/DCv2-repo release layout: `module.` + trunk, projection head and prototypes (= centroids)."""
  sd = dict(_trunk_state_dict(variables, step))
  if "head" in variables["params"]:
    sd.update({f"projection_head.{k}": v for k, v in _head_state_dict(variables, config, step).items()})
  sd.update({f"prototypes.{k}": v for k, v in _prototypes(centroids).items()})
  return {f"module.{k}": v for k, v in sd.items()}


def to_vissl(variables: Mapping, centroids, config, step: int = 0) -> dict:
  """VISSL checkpoint nesting; the head is VISSL's swav_head, head 0 of the model's ModuleList."""
  trunk = {f"_feature_blocks.{k}": v for k, v in _trunk_state_dict(variables, step).items()}
  heads = {}
  if "head" in variables["params"]:
    heads.update({f"0.projection_head.{k}": v for k, v in _head_state_dict(variables, config, step).items()})
  heads.update({f"0.{k}": v for k, v in _prototypes(centroids).items()})
  return {VISSL_PREFIX[0]: {VISSL_PREFIX[1]: {VISSL_PREFIX[2]: {"trunk": trunk, "heads": heads}}}}


def flatten_state_dict(sd: Mapping, sep: str = ".") -> dict[str, np.ndarray]:
  """Nested dicts -> flat '.'-joined keys; non-array leaves (VISSL's ints, strings) are dropped."""
  out = {}
  for path, v in _flat(sd).items():
    if hasattr(v, "shape"):
      out[sep.join(map(str, path))] = v
  return out


def save_state_dict(sd: Mapping, path: str, metadata: Mapping[str, str] | None = None) -> None:
  """Write by suffix: .safetensors (flat '.'-joined keys, no torch needed) or .pth/.pt (torch.save)."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith(".safetensors"):
    from safetensors.numpy import save_file
    # np.array, not np.ascontiguousarray: the latter turns the 0-d num_batches_tracked into shape [1].
    save_file({k: np.array(v, order="C") for k, v in flatten_state_dict(sd).items()}, path,
              metadata=dict(metadata or {}))
  elif path.endswith((".pth", ".pt", ".pth.tar")):
    import torch

    def to_torch(x):
      return {k: to_torch(v) for k, v in x.items()} if isinstance(x, Mapping) else torch.from_numpy(np.array(x))
    torch.save(to_torch(sd), path)
  else:
    raise ValueError(f"{path}: the output file must end in .safetensors or .pth")


def load_state_dict_file(path: str) -> dict[str, np.ndarray]:
  """A .safetensors or torch (.pth/.pt/.tar) file -> flat {name: np.ndarray} (nesting joined by '.')."""
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return load_file(path)
  import torch
  obj = torch.load(path, map_location="cpu", weights_only=True)
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


# ----------------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------------

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
  """A torchvision / SwAV / VISSL ResNet state dict -> (depth, width, variables for models.ResNet).

  Depth comes from the block counts and block kind, width from the stem's channels (64 * width). A stem
  that is not a multiple of 64 (small test models) is returned as width 1 and base width = stem channels:
  the network only depends on their product, which `trunk_base_width` recovers from the variables.
  Raises ValueError naming missing / unexpected / mis-shaped keys.
  """
  import jax
  import jax.numpy as jnp
  from dcv2_jax.models import STAGES, ResNet

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
  stem = int(np.shape(sd["conv1.weight"])[0])
  width, base_width = (stem // 64, 64) if stem % 64 == 0 else (1, stem)

  shapes = jax.eval_shape(lambda: ResNet(depth, width, base_width).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.float32), train=False))
  expected = {}
  for collection in ("params", "batch_stats"):
    for path, leaf in _flat(shapes[collection]).items():
      expected[_trunk_name(collection, path)] = (collection, path, leaf.shape)
  missing = sorted((k for k in expected if k not in sd), key=_natural)
  unexpected = sorted((k for k in sd if k not in expected and not _IGNORED_ON_IMPORT.search(k)), key=_natural)
  if missing or unexpected:
    raise ValueError(f"State dict does not match a ResNet-{depth} (width {width}, {kind} blocks {counts}). "
                     + "; ".join(_summary(t, ks) for t, ks in (("Missing", missing), ("Unexpected", unexpected))
                                 if ks))
  variables: dict = {"params": {}, "batch_stats": {}}
  bad = []
  for name, (collection, path, shape) in expected.items():
    value = np.asarray(sd[name], np.float32)
    if path[-1] == "kernel":               # OIHW -> HWIO
      value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    if value.shape != tuple(shape):
      bad.append(f"{name} {tuple(value.shape)} != {tuple(shape)}")
      continue
    node = variables[collection]
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = jnp.asarray(value)
  if bad:
    raise ValueError(f"Shape mismatch against ResNet-{depth} width {width}: " + _summary("Mismatched", bad))
  return depth, width, variables


def trunk_base_width(variables: Mapping, width: int) -> int:
  return int(np.shape(variables["params"]["conv1"]["conv"]["kernel"])[-1]) // width


@functools.lru_cache(maxsize=None)
def _trunk_apply(depth: int, width: int, base_width: int, eps: float):
  # Cached so every load of the same architecture reuses one jitted (and compiled) function.
  import jax
  import jax.numpy as jnp
  from dcv2_jax.models import ResNet
  model = ResNet(depth, width, base_width, dtype=jnp.float32, bn_eps=eps)
  return jax.jit(lambda variables, images: model.apply(variables, images, train=False))


def load_trunk(path: str):
  """A workdir, checkpoint or exported torchvision/SwAV/VISSL file -> (apply_fn, trunk variables).

  `apply_fn(variables, images)`: float32 NHWC normalised images -> pooled [B, feature_dim] features,
  BatchNorm in eval mode (running statistics). `variables` = {'params', 'batch_stats'} of models.ResNet,
  ready for evaluation or fine-tuning.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    from dcv2_jax.checkpoint import restore_model_variables
    config, variables, _, _ = restore_model_variables(path)
    m = config.model
    trunk = _part(variables, "trunk")
    return _trunk_apply(m.depth, m.width, m.base_width, float(m.bn_eps)), trunk
  if not os.path.exists(path):
    raise FileNotFoundError(path)
  depth, width, variables = from_torch_state_dict(load_state_dict_file(path))
  return _trunk_apply(depth, width, trunk_base_width(variables, width), 1e-5), variables


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

def export(workdir: str, fmt: str, out: str) -> dict:
  """Newest checkpoint of `workdir` (or a checkpoint dir) -> `out` in format `fmt`; returns the dict."""
  from dcv2_jax.checkpoint import restore_model_variables
  config, variables, centroids, step = restore_model_variables(workdir)
  step = int(step or 0)
  if fmt == "torchvision":
    sd = to_torchvision(variables, config, step)
  elif fmt == "swav":
    sd = to_swav(variables, centroids, config, step)
  elif fmt == "vissl":
    sd = to_vissl(variables, centroids, config, step)
  else:
    raise ValueError(f"--format {fmt!r}: choose one of {FORMATS}")
  m = config.model
  save_state_dict(sd, out, {"format": fmt, "depth": str(m.depth), "width": str(m.width), "step": str(step)})
  return sd


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m dcv2_jax.export", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="training workdir (newest checkpoint) or a checkpoint dir")
  parser.add_argument("--format", required=True, choices=FORMATS)
  parser.add_argument("--out", required=True, help="output file: .pth (needs torch) or .safetensors")
  args = parser.parse_args(argv)
  try:
    sd = export(args.workdir, args.format, args.out)
  except (ValueError, FileNotFoundError) as e:   # bad input: a message, not a traceback
    raise SystemExit(f"error: {e}") from None
  print(f"wrote {len(flatten_state_dict(sd))} tensors ({args.format}) to {args.out}")


if __name__ == "__main__":
  main()
