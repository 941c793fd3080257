"""model/trunk.py: TrunkArch from a config and its feature width (against the network's own output shape), parameter
counts equal to torchvision's ResNet-50 and ResNeXt-50 32x4d, and the cached evaluation forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcv2_jax.config import base_config
from dcv2_jax.model.trunk import ResNet, TrunkArch, trunk_apply_fn


def model_config(**fields):
  m = base_config().model
  for k, v in fields.items():
    setattr(m, k, v)
  return m


def shapes(arch, size=32):
  """The trunk's variables and pooled output as shapes only (no weights drawn, nothing run)."""
  model = ResNet(arch)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  return variables, jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)


def param_count(variables):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("fields,arch,feature_dim", [
    (dict(depth=18), TrunkArch(18), 512),
    (dict(depth=50), TrunkArch(50), 2048),
    (dict(depth=50, width=2), TrunkArch(50, width=2), 4096),
    (dict(depth=18, width=2, base_width=16), TrunkArch(18, width=2, base_width=16), 256),
    (dict(depth=50, groups=32, width_per_group=4), TrunkArch(50, groups=32, width_per_group=4), 2048),
    (dict(depth=18, stem="cifar", bn_eps=1e-3), TrunkArch(18, stem="cifar", bn_eps=1e-3), 512)],
    ids=["resnet18", "resnet50", "resnet50w2", "resnet18w2_base16", "resnext50_32x4d", "resnet18_cifar"])
def test_arch_from_config_and_its_feature_dim(fields, arch, feature_dim):
  got = TrunkArch.from_config(model_config(**fields))
  assert got == arch and hash(got) == hash(arch)
  assert got.feature_dim == feature_dim
  _, out = shapes(got)
  assert out.shape == (2, got.feature_dim) and out.dtype == jnp.float32     # what the network really pools to


def test_arch_from_config_reads_every_field():
  m = model_config(depth=101, width=3, base_width=32, groups=8, width_per_group=16, stem="cifar", bn_eps=2e-5)
  assert TrunkArch.from_config(m) == TrunkArch(101, 3, 32, 8, 16, "cifar", 2e-5)


def torchvision_params_without_fc(name):
  import torchvision
  model = getattr(torchvision.models, name)()
  return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("fc."))


@pytest.mark.torch
@pytest.mark.parametrize("arch,torchvision_name", [(TrunkArch(50), "resnet50"), (TrunkArch(18), "resnet18"),
                                                   (TrunkArch(50, groups=32, width_per_group=4), "resnext50_32x4d")])
def test_parameter_count_equals_torchvisions_without_fc(arch, torchvision_name):
  """Trainable parameters only: BatchNorm's running statistics are batch_stats here and buffers in torch."""
  variables, _ = shapes(arch)
  assert param_count(variables) == torchvision_params_without_fc(torchvision_name)


def test_trunk_apply_fn_is_one_function_per_arch_and_the_eval_forward():
  small = TrunkArch(18, base_width=8)
  fn = trunk_apply_fn(small)
  assert trunk_apply_fn(TrunkArch(18, base_width=8)) is fn            # an equal arch, another instance
  assert trunk_apply_fn(TrunkArch(18, base_width=16)) is not fn
  model = ResNet(small)
  x = np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype(np.float32)
  variables = model.init(jax.random.key(1), jnp.asarray(x), train=False)
  want = model.apply(variables, x, train=False)
  np.testing.assert_allclose(np.asarray(fn(variables, x)), np.asarray(want), rtol=1e-5, atol=1e-6)
