"""dcv2-jax: DeepClusterV2 (self-supervised ResNet training) in JAX/Flax.

Kept import-light on purpose: `import dcv2_jax` pulls in neither torch nor the model code, so tools that
only need one submodule (export to .safetensors, data preparation) start fast and run without torch.
"""


def load_trunk(path):
  """(apply_fn, variables) for a workdir, checkpoint or exported torchvision/SwAV/VISSL file.

  See dcv2_jax.load.load_trunk; imported on first use so that `import dcv2_jax` stays light.
  """
  from dcv2_jax import load  # pylint: disable=g-import-not-at-top
  return load.load_trunk(path)
