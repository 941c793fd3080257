"""dcv2-jax: DeepClusterV2 (self-supervised ResNet training) in JAX/Flax.

Kept import-light on purpose: `import dcv2_jax` pulls in neither torch nor the model code, so tools that
only need one submodule (export to .safetensors, data preparation) start fast and run without torch.
"""


def load_trunk(path):
  """(apply_fn, variables) for a workdir, checkpoint or exported torchvision/SwAV/VISSL file.

  See dcv2_jax.export.load_trunk; imported lazily so `import dcv2_jax` stays light.
  """
  from dcv2_jax.export import load_trunk as _load_trunk
  return _load_trunk(path)
