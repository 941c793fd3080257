"""Weight export/import against torchvision: key names, shapes and eval-mode features on real photographs.

Parity needs non-trivial BatchNorm (tests/torch_reference.py: with_trained_bn): a swapped mean/var or a missed
transpose would then show.
"""
import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import traverse_util

from dcv2_jax import export as E
from dcv2_jax import load
from dcv2_jax.model.head import ProjectionHead
from dcv2_jax.model.trunk import ResNet, TrunkArch
from dcv2_jax.run import checkpoint
import dcv2_jax
from torch_reference import (  # noqa: F401  (photos and rn18 are fixtures)
    assert_close, config_for, load_into_torchvision, numpy_init, our_features, photos, rn18, torchvision_features,
    trunk_of, with_trained_bn)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.torch


def test_resnet18_export_matches_torchvision(rn18, photos):
  config, v, _ = rn18
  sd = E.to_torchvision(v, config, step=7)
  assert sd["conv1.weight"].shape == (64, 3, 7, 7) and sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
  assert sd["bn1.num_batches_tracked"].dtype == np.int64 and int(sd["bn1.num_batches_tracked"]) == 7
  tv = load_into_torchvision("resnet18", sd)
  assert_close(our_features(18, trunk_of(v), photos), torchvision_features(tv, photos), 1e-4)


def test_resnet50_export_matches_torchvision(photos, tmp_path):
  model = ResNet(TrunkArch(50))
  v = numpy_init(model, jnp.zeros((1, 32, 32, 3)))
  v = with_trained_bn(model, v, (4, 64, 64, 3))
  sd = E.to_torchvision(v, config_for(50))
  assert sd["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
  path = str(tmp_path / "rn50.pth")
  E.save_state_dict(sd, path)
  tv = load_into_torchvision("resnet50", torch.load(path))   # the one-liner of docs/export.md
  assert_close(our_features(50, v, photos), torchvision_features(tv, photos), 1e-4)


def test_swav_export_round_trips_with_head_and_prototypes(rn18, photos, tmp_path):
  config, v, centroids = rn18
  sd = E.to_swav(v, centroids, config, step=3)
  trunk = {k[len("module."):]: x for k, x in sd.items() if not k.startswith(("module.projection_head",
                                                                              "module.prototypes"))}
  assert all(k.startswith("module.") for k in sd)
  assert trunk.keys() == E.to_torchvision(v, config).keys()
  # Default-style head Linear -> BN -> ReLU -> Linear is nn.Sequential indices 0, 1, 3.
  head = {k[len("module.projection_head."):]: x for k, x in sd.items() if k.startswith("module.projection_head.")}
  assert head["0.weight"].shape == (64, 512) and head["3.weight"].shape == (16, 64)
  assert head["1.running_var"].shape == (64,) and head["1.num_batches_tracked"].dtype == np.int64
  for h in range(2):
    np.testing.assert_array_equal(sd[f"module.prototypes.prototypes{h}.weight"], centroids[h])
  assert "module.prototypes.prototypes2.weight" not in sd

  # The head loads strictly into the SwAV repo's nn.Sequential and computes what ours computes.
  torch_head = torch.nn.Sequential(torch.nn.Linear(512, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                                   torch.nn.Linear(64, 16))
  torch_head.load_state_dict({k: torch.from_numpy(np.array(x)) for k, x in head.items()}, strict=True)
  torch_head.eval()
  feats = np.array(our_features(18, trunk_of(v), photos))
  ours = ProjectionHead((64, 16)).apply({"params": v["params"]["head"], "batch_stats": v["batch_stats"]["head"]},
                                         feats, train=False)
  with torch.no_grad():
    assert_close(ours, torch_head(torch.from_numpy(feats)).numpy(), 1e-4)

  path = str(tmp_path / "dcv2_rn18.pth")
  E.save_state_dict(sd, path)
  apply_fn, loaded = dcv2_jax.load_trunk(path)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(trunk_of(v)))
  np.testing.assert_allclose(np.asarray(apply_fn(loaded, photos)), feats, rtol=1e-5, atol=1e-5)


def test_vissl_export_layout_and_round_trip(rn18, photos, tmp_path):
  config, v, centroids = rn18
  sd = E.to_vissl(v, centroids, config)
  model = sd["classy_state_dict"]["base_model"]["model"]
  assert model["trunk"]["_feature_blocks.conv1.weight"].shape == (64, 3, 7, 7)
  assert "_feature_blocks.layer4.1.bn2.running_var" in model["trunk"]
  assert model["heads"]["0.projection_head.0.weight"].shape == (64, 512)
  assert model["heads"]["0.prototypes1.weight"].shape == (10, 16)
  want = our_features(18, trunk_of(v), photos)
  for name in ("vissl.pth", "vissl.safetensors"):
    path = str(tmp_path / name)
    E.save_state_dict(sd, path)
    apply_fn, loaded = dcv2_jax.load_trunk(path)
    np.testing.assert_allclose(np.asarray(apply_fn(loaded, photos)), want, rtol=1e-5, atol=1e-5)
  from safetensors.numpy import load_file
  flat = load_file(str(tmp_path / "vissl.safetensors"))
  assert "classy_state_dict.base_model.model.trunk._feature_blocks.layer1.0.conv1.weight" in flat


def test_safetensors_export_without_torch(rn18, tmp_path):
  """In a process where `import torch` fails: package import, export and load_trunk all work."""
  path, npz = str(tmp_path / "rn18.safetensors"), str(tmp_path / "trunk.npz")
  np.savez(npz, **{"/".join(k): x for k, x in traverse_util.flatten_dict(trunk_of(rn18[1])).items()})
  script = textwrap.dedent(f"""
    import sys
    import dcv2_jax, dcv2_jax.export as E
    assert "torch" not in sys.modules, "importing dcv2_jax pulled in torch"
    sys.modules["torch"] = None  # any later `import torch` raises ImportError
    import numpy as np
    from flax import traverse_util
    from dcv2_jax.config import base_config
    from dcv2_jax.model.trunk import ResNet, TrunkArch
    c = base_config(); c.model.depth = 18
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    v = traverse_util.unflatten_dict({{tuple(k.split("/")): a for k, a in np.load({npz!r}).items()}})
    E.save_state_dict(E.to_torchvision(v, c), {path!r}, {{"format": "torchvision"}})
    apply_fn, loaded = dcv2_jax.load_trunk({path!r})
    np.testing.assert_allclose(apply_fn(loaded, x), ResNet(TrunkArch(18)).apply(v, x, train=False), rtol=1e-5, atol=1e-5)
    print("ok")
  """)
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
  from safetensors.torch import load_file
  load_into_torchvision("resnet18", load_file(path))


def test_wide_resnet_needs_swav_format():
  v = numpy_init(ResNet(TrunkArch(18, width=2)), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="--format swav"):
    E.to_torchvision(v, config_for(18, width=2))
  # A narrow test model (base width 16) is no torchvision model either.
  small = numpy_init(ResNet(TrunkArch(18, base_width=16)), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="--format swav"):
    E.to_torchvision(small, config_for(18, base_width=16))
  for variables, width in ((v, 2), (small, 1)):
    depth, w, loaded = load.from_torch_state_dict(E.to_swav(variables, None, config_for(18, width=width)))
    assert (depth, w) == (18, width)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(variables))


def test_cli_and_workdir_loading_with_a_checkpoint_stub(rn18, tmp_path, monkeypatch):
  """The CLI and load_trunk(dir) through dcv2_jax.checkpoint.restore_model_variables (stubbed)."""
  config, v, centroids = rn18
  calls = []

  def restore_model_variables(path):
    calls.append(path)
    return config, v, centroids, 123
  monkeypatch.setattr(checkpoint, "restore_model_variables", restore_model_variables)
  workdir = str(tmp_path / "workdir")
  os.makedirs(workdir)
  for fmt in E.FORMATS:
    out = str(tmp_path / f"{fmt}.safetensors")
    E.main(["--workdir", workdir, "--format", fmt, "--out", out])
    from safetensors.numpy import load_file
    sd = load_file(out)
    key = {"torchvision": "bn1.num_batches_tracked", "swav": "module.bn1.num_batches_tracked",
           "vissl": "classy_state_dict.base_model.model.trunk._feature_blocks.bn1.num_batches_tracked"}[fmt]
    assert int(sd[key]) == 123
  assert calls == [workdir] * 3

  apply_fn, loaded = dcv2_jax.load_trunk(workdir)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(trunk_of(v)))
  assert apply_fn(loaded, np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 512)

  wide = config_for(18, width=2, head_dims=(64, 16))
  monkeypatch.setattr(checkpoint, "restore_model_variables", lambda path: (wide, v, centroids, 0))
  with pytest.raises(SystemExit, match="--format swav"):
    E.main(["--workdir", workdir, "--format", "torchvision", "--out", str(tmp_path / "w2.pth")])


def test_export_and_load_trunk_from_a_real_checkpoint(rn18, photos, tmp_path):
  """End to end through dcv2_jax.checkpoint: a saved workdir -> CLI export and load_trunk."""
  config, v, centroids = rn18
  workdir = str(tmp_path / "run")
  ckpt = checkpoint.Checkpoints(workdir, async_save=False)
  state = {"params": v["params"], "batch_stats": v["batch_stats"], "centroids": centroids,
           "step": np.asarray(42, np.int32)}
  ckpt.save(42, state, dataclasses.asdict(checkpoint.TrainRecord(42, 1000, 64, config.to_json())))   # as trainer
  ckpt.close()

  out = str(tmp_path / "dcv2.safetensors")
  E.main(["--workdir", workdir, "--format", "swav", "--out", out])
  from safetensors.numpy import load_file
  sd = load_file(out)
  np.testing.assert_array_equal(sd["module.prototypes.prototypes1.weight"], centroids[1])
  assert int(sd["module.layer1.0.bn1.num_batches_tracked"]) == 42

  want = our_features(18, trunk_of(v), photos)
  for path in (workdir, os.path.join(workdir, "checkpoints", "42"), out):
    apply_fn, loaded = dcv2_jax.load_trunk(path)
    np.testing.assert_allclose(np.asarray(apply_fn(loaded, photos)), want, rtol=1e-5, atol=1e-5)


def test_resnext50_32x4d_exports_to_torchvision_and_loads_back(photos, tmp_path):
  """model.groups=32, width_per_group=4: the file loads into torchvision.models.resnext50_32x4d() (only fc
  missing) with our features, and load_trunk reads torchvision's own ResNeXt file back."""
  model = ResNet(TrunkArch(50, groups=32, width_per_group=4))
  v = numpy_init(model, jnp.zeros((1, 32, 32, 3)))
  v = with_trained_bn(model, v, (4, 64, 64, 3))
  config = config_for(50)
  config.model.groups, config.model.width_per_group = 32, 4
  sd = E.to_torchvision(v, config)
  assert sd["layer1.0.conv2.weight"].shape == (128, 4, 3, 3)      # 32 groups of 4 channels
  assert E.torchvision_model(config.model) == "torchvision.models.resnext50_32x4d()"
  path = str(tmp_path / "rx50.pth")
  E.save_state_dict(sd, path)
  tv = load_into_torchvision("resnext50_32x4d", torch.load(path))
  ours = np.asarray(model.apply(v, photos, train=False))
  assert_close(ours, torchvision_features(tv, photos), 1e-4)
  torch.save(tv.state_dict(), path)                               # torchvision's own file, fc included
  apply_fn, loaded = dcv2_jax.load_trunk(path)
  assert_close(np.asarray(apply_fn(loaded, photos)), ours, 1e-4)
  arch, _ = load.trunk_from_state_dict(tv.state_dict())
  assert (arch.depth, arch.groups, arch.width_per_group, arch.stem) == (50, 32, 4, "imagenet")


def test_cifar_stem_exports_to_torchvision_after_the_two_changes_it_names(tmp_path):
  """model.stem=cifar (3x3/1 conv, no max-pool): the torchvision-format file loads into resnet18() once conv1 and
  maxpool are replaced as the export says, with our features; load_trunk reads it back as the CIFAR stem."""
  model = ResNet(TrunkArch(18, stem="cifar"))
  v = numpy_init(model, jnp.zeros((1, 32, 32, 3)))
  v = with_trained_bn(model, v, (4, 32, 32, 3))
  config = config_for(18)
  config.model.stem = "cifar"
  sd = E.to_torchvision(v, config)
  assert sd["conv1.weight"].shape == (64, 3, 3, 3)
  how = E.torchvision_model(config.model)
  assert "model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)" in how and "model.maxpool = torch.nn.Identity()" in how
  tv = torchvision.models.resnet18()
  tv.conv1, tv.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
  result = tv.load_state_dict({k: torch.from_numpy(np.array(x)) for k, x in sd.items()}, strict=False)
  assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
  images = np.random.default_rng(3).normal(size=(3, 32, 32, 3)).astype(np.float32)
  ours = np.asarray(model.apply(v, images, train=False))
  assert_close(ours, torchvision_features(tv, images), 1e-4)
  path = str(tmp_path / "cifar_rn18.safetensors")
  E.save_state_dict(sd, path)
  apply_fn, loaded = dcv2_jax.load_trunk(path)
  assert_close(np.asarray(apply_fn(loaded, images)), ours, 1e-4)
