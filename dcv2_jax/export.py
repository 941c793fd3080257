"""Weight export to PyTorch layouts (and the files they are written to).

  python -m dcv2_jax.export --workdir W --format {torchvision,swav,vissl} --out FILE(.pth|.safetensors)

Formats (see docs/export.md):
  torchvision  trunk only, torchvision's ResNet key names; loads into torchvision.models.resnetXX().
  swav         the SwAV/DCv2 repo release layout: `module.` + trunk keys, `module.projection_head.{i}.*`
               and `module.prototypes.prototypes{h}.weight` [K, D] (the k-means centroids of head h).
  vissl        VISSL's checkpoint nesting: classy_state_dict.base_model.model.{trunk,heads}, trunk keys
               `_feature_blocks.<torchvision name>`, heads as VISSL's swav_head (`0.projection_head.*`).

Conversion functions are pure (pytrees of arrays in, {name: np.ndarray} out). Torch is imported only to
write .pth files, so the .safetensors path works where torch is not installed. The way back (PyTorch files
into JAX, `dcv2_jax.load_trunk`) is load.py.
"""
from __future__ import annotations

import argparse
import os
from typing import Mapping

import numpy as np
from safetensors.numpy import save_file

from dcv2_jax import cli
from dcv2_jax.run import checkpoint
from dcv2_jax.torch_names import VISSL_PREFIX, flatten_state_dict, model_part, trunk_state_dict

FORMATS = ("torchvision", "swav", "vissl")


def _head_state_dict(variables: Mapping, config, step: int) -> dict[str, np.ndarray]:
  """Our ProjectionHead as PyTorch's nn.Sequential(Linear, [BN], [ReLU], ..., Linear) indices."""
  part = model_part(variables, "head")
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


def _prototypes(centroids, config) -> dict[str, np.ndarray]:
  """The centroids of each head as nn.Linear(D, K_h, bias=False).weight [K_h, D] (row k is centroid k, so
  logits = z @ W^T as in training); heads of fewer clusters than the largest lose their padding."""
  if centroids is None:
    return {}
  c = np.asarray(centroids, np.float32)
  if c.ndim != 3:
    raise ValueError(f"centroids must be [heads, K, D], got shape {c.shape}")
  ks = [int(k) for k in config.loss.num_clusters]
  if len(ks) != c.shape[0]:
    ks = [c.shape[1]] * c.shape[0]
  return {f"prototypes{h}.weight": np.ascontiguousarray(c[h, :ks[h]]) for h in range(c.shape[0])}


def to_torchvision(variables: Mapping, config, step: int = 0) -> dict[str, np.ndarray]:
  """Trunk as a torchvision ResNet state dict (no `fc`): load with `load_state_dict(sd, strict=False)`.

  `variables` are a DCv2Model's or a bare ResNet's {'params', 'batch_stats'}; `step` becomes
  num_batches_tracked (PyTorch only reads it when BN momentum is None).
  """
  m = config.model
  stem = np.shape(model_part(variables, "trunk")["params"]["conv1"]["conv"]["kernel"])[-1]
  if m.width != 1:
    raise ValueError(f"A width-{m.width} ResNet-{m.depth} (SwAV's resnet{m.depth}w{m.width}) has no torchvision "
                     f"equivalent (torchvision's wide_resnet multiplies only the bottleneck's inner width); "
                     f"use --format swav, which dcv2_jax.load_trunk and the SwAV repo's models load")
  if stem != 64:
    raise ValueError(f"This ResNet's stem has {stem} channels (model.base_width={m.base_width}); torchvision "
                     f"ResNets have 64. Use --format swav, which dcv2_jax.load_trunk loads")
  return trunk_state_dict(variables, step)


def torchvision_model(model_cfg) -> str:
  """The torchvision constructor the export loads into, plus what to change on it for the CIFAR stem."""
  name = f"resnet{model_cfg.depth}"
  if model_cfg.groups > 1:
    name = f"resnext{model_cfg.depth}_{model_cfg.groups}x{model_cfg.width_per_group}d"
  call = f"torchvision.models.{name}()"
  if model_cfg.stem == "cifar":      # torchvision has no CIFAR stem: two modules to replace after construction
    call += ("; then model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); model.maxpool = "
             "torch.nn.Identity() (the CIFAR stem), before load_state_dict")
  return call


def to_swav(variables: Mapping, centroids, config, step: int = 0) -> dict[str, np.ndarray]:
  """SwAV/DCv2-repo release layout: `module.` + trunk, projection head and prototypes (= centroids)."""
  sd = dict(trunk_state_dict(variables, step))
  if "head" in variables["params"]:
    sd.update({f"projection_head.{k}": v for k, v in _head_state_dict(variables, config, step).items()})
  sd.update({f"prototypes.{k}": v for k, v in _prototypes(centroids, config).items()})
  return {f"module.{k}": v for k, v in sd.items()}


def to_vissl(variables: Mapping, centroids, config, step: int = 0) -> dict:
  """VISSL checkpoint nesting; the head is VISSL's swav_head, head 0 of the model's ModuleList."""
  trunk = {f"_feature_blocks.{k}": v for k, v in trunk_state_dict(variables, step).items()}
  heads = {}
  if "head" in variables["params"]:
    heads.update({f"0.projection_head.{k}": v for k, v in _head_state_dict(variables, config, step).items()})
  heads.update({f"0.{k}": v for k, v in _prototypes(centroids, config).items()})
  return {VISSL_PREFIX[0]: {VISSL_PREFIX[1]: {VISSL_PREFIX[2]: {"trunk": trunk, "heads": heads}}}}


def save_state_dict(sd: Mapping, path: str, metadata: Mapping[str, str] | None = None) -> None:
  """Write by suffix: .safetensors (flat '.'-joined keys, no torch needed) or .pth/.pt (torch.save)."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith(".safetensors"):
    # np.array, not np.ascontiguousarray: the latter turns the 0-d num_batches_tracked into shape [1].
    save_file({k: np.array(v, order="C") for k, v in flatten_state_dict(sd).items()}, path,
              metadata=dict(metadata or {}))
  elif path.endswith((".pth", ".pt", ".pth.tar")):
    import torch  # pylint: disable=g-import-not-at-top  (late: only .pth files need torch, an optional package)

    def to_torch(x):
      return {k: to_torch(v) for k, v in x.items()} if isinstance(x, Mapping) else torch.from_numpy(np.array(x))
    torch.save(to_torch(sd), path)
  else:
    raise ValueError(f"{path}: the output file must end in .safetensors or .pth")


def export(workdir: str, fmt: str, out: str):
  """Newest checkpoint of `workdir` (or a checkpoint dir) -> `out` in format `fmt`; returns (config, state dict)."""
  config, variables, centroids, step = checkpoint.restore_model_variables(workdir)
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
  save_state_dict(sd, out, {"format": fmt, "depth": str(m.depth), "width": str(m.width), "groups": str(m.groups),
                            "width_per_group": str(m.width_per_group), "stem": str(m.stem), "step": str(step)})
  return config, sd


@cli.one_line_errors
def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m dcv2_jax.export", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="training workdir (newest checkpoint) or a checkpoint dir")
  parser.add_argument("--format", required=True, choices=FORMATS)
  parser.add_argument("--out", required=True, help="output file: .pth (needs torch) or .safetensors")
  args = parser.parse_args(argv)
  config, sd = export(args.workdir, args.format, args.out)
  print(f"wrote {len(flatten_state_dict(sd))} tensors ({args.format}) to {args.out}")
  if args.format == "torchvision":
    print(f"load with: model = {torchvision_model(config.model)}; "
          "model.load_state_dict(torch.load(FILE), strict=False)  # missing: fc.*")


if __name__ == "__main__":
  main()
