"""load_trunk / load.from_torch_state_dict: torchvision's own ResNet-50 file imports with torchvision's features on
real photographs; malformed state dicts raise errors that name what is wrong."""
import numpy as np
import pytest
import torch
import torchvision

from dcv2_jax import export as E
from dcv2_jax import load
import dcv2_jax
from torch_reference import assert_close, photos, torchvision_features  # noqa: F401  (photos: a fixture)

pytestmark = pytest.mark.torch


def test_torchvision_resnet50_imports_with_load_trunk(photos, tmp_path):
  torch.manual_seed(0)
  tv = torchvision.models.resnet50()   # random init, no download
  for mod in tv.modules():             # non-trivial BN, as after training
    if isinstance(mod, torch.nn.BatchNorm2d):
      n = mod.num_features
      mod.weight.data.uniform_(0.5, 1.5)
      mod.bias.data.normal_(0, 0.2)
      mod.running_mean.normal_(0, 0.2)
      mod.running_var.uniform_(0.5, 2.0)
      assert mod.running_mean.shape == (n,)
  path = str(tmp_path / "rn50.pth")
  torch.save(tv.state_dict(), path)    # includes fc.*: ignored by the trunk import
  apply_fn, variables = dcv2_jax.load_trunk(path)
  feats = np.asarray(apply_fn(variables, photos))
  assert feats.shape == (2, 2048)
  assert_close(feats, torchvision_features(tv, photos), 1e-4)


def test_bad_state_dicts_raise_clear_errors(tmp_path):
  with pytest.raises(ValueError, match=r"Not a ResNet state dict.*foo\.weight"):
    load.from_torch_state_dict({"foo.weight": np.zeros((3, 3))})

  rn50 = {k: v.numpy() for k, v in torchvision.models.resnet50().state_dict().items()}
  depth, width, _ = load.from_torch_state_dict(rn50)
  assert (depth, width) == (50, 1)
  with pytest.raises(ValueError, match="Depth mismatch: expected ResNet-101"):
    load.from_torch_state_dict(rn50, depth=101)

  no_block = {k: v for k, v in rn50.items() if not k.startswith("layer3.5.")}
  with pytest.raises(ValueError, match=r"ResNet-50.*\(3, 4, 5, 3\).*Missing \(15\): layer3\.5\.bn1\.bias, "):
    load.from_torch_state_dict(no_block)

  missing = dict(rn50)
  del missing["layer2.1.bn2.running_var"]
  with pytest.raises(ValueError, match=r"Missing \(1\): layer2\.1\.bn2\.running_var"):
    load.from_torch_state_dict(missing)

  extra = dict(rn50, **{f"adapter.{i}.weight": np.zeros(3) for i in range(12)})
  with pytest.raises(ValueError, match=r"Unexpected \(12\): adapter\.0\.weight.*\(2 more\)"):
    load.from_torch_state_dict(extra)

  bad_shape = dict(rn50, **{"layer1.0.conv2.weight": np.zeros((64, 64, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"layer1\.0\.conv2\.weight \(1, 1, 64, 64\) != \(3, 3, 64, 64\)"):
    load.from_torch_state_dict(bad_shape)

  path = str(tmp_path / "tensor.pth")
  torch.save(torch.zeros(3), path)
  with pytest.raises(ValueError, match="expected a state dict"):
    dcv2_jax.load_trunk(path)
  with pytest.raises(ValueError, match=".pth"):
    E.save_state_dict({}, str(tmp_path / "out.npz"))
