"""Weight export/import against torchvision: key names, shapes and eval-mode features on real photographs.

Parity needs non-trivial BatchNorm: we perturb every BN scale/bias and run train-mode passes so the
running statistics are neither 0 nor 1 (a swapped mean/var or a missed transpose would then show).
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
from dcv2_jax.config import base_config
from dcv2_jax.model.head import ProjectionHead
from dcv2_jax.model.multi_crop import DCv2Model
from dcv2_jax.model.trunk import ResNet, TrunkArch
from dcv2_jax.run import checkpoint
import dcv2_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.torch


def assert_close(ours, ref, rtol):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape
  scale = np.abs(ref).max()
  assert scale > 1e-3, "degenerate features: the comparison would prove nothing"
  err = np.abs(ours - ref).max() / scale
  assert err <= rtol, f"max relative error {err:.2e} > {rtol:.0e}"


def config_for(depth, width=1, base_width=64, head_dims=(2048, 128)):
  c = base_config()
  c.model.depth, c.model.width, c.model.base_width, c.model.head_dims = depth, width, base_width, head_dims
  return c


@pytest.fixture(scope="module")
def photos():
  """sklearn's two sample photographs, short side 256, centre crop 224, ImageNet-normalised, NHWC."""
  from PIL import Image
  from sklearn.datasets import load_sample_images
  out = []
  for img in load_sample_images().images:
    h, w = img.shape[:2]
    im = Image.fromarray(img).resize((round(w * 256 / h), 256), Image.BILINEAR)
    x = np.asarray(im, np.float32) / 255.0
    top, left = (x.shape[0] - 224) // 2, (x.shape[1] - 224) // 2
    out.append(x[top:top + 224, left:left + 224])
  x = (np.stack(out) - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  return x.astype(np.float32)


def numpy_init(model, *args):
  """Variables of `model` drawn with numpy: flax's init of ResNet-50 takes ~15 s on 2 CPU cores."""
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, train=False))

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel" and len(leaf.shape) == 4:   # torchvision's kaiming_normal_(fan_out)
      return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:2] + leaf.shape[3:])), leaf.shape).astype(np.float32)
    if name == "kernel":
      return rng.uniform(-1, 1, leaf.shape).astype(np.float32) / np.sqrt(leaf.shape[0])
    return (np.ones if name in ("scale", "var") else np.zeros)(leaf.shape, np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def with_trained_bn(model, variables, shape, wrap=lambda x: x, passes=3, seed=0):
  """Perturb BN scale/bias, then update running stats with train-mode passes on random images."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(jax.device_get(variables["params"]))
  for k, v in flat.items():
    if k[-1] == "scale":
      flat[k] = v * rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
    elif k[-1] == "bias" and k[-2].startswith(("bn", "downsample_bn")):
      flat[k] = v + rng.normal(0, 0.2, v.shape).astype(np.float32)
  params = traverse_util.unflatten_dict(flat)
  stats = variables["batch_stats"]
  step = jax.jit(lambda p, s, x: model.apply({"params": p, "batch_stats": s}, x, train=True,
                                             mutable=["batch_stats"])[1]["batch_stats"])
  for i in range(passes):
    x = rng.normal(0.3 * i, 1.0 + 0.2 * i, shape).astype(np.float32)
    stats = step(params, stats, wrap(x))
  stats = jax.device_get(stats)
  means = [np.abs(v).mean() for k, v in traverse_util.flatten_dict(stats).items() if k[-1] == "mean"]
  vars_ = [np.abs(v - 1).mean() for k, v in traverse_util.flatten_dict(stats).items() if k[-1] == "var"]
  assert min(means) > 1e-4 and min(vars_) > 1e-4, "running statistics stayed trivial"
  return {"params": params, "batch_stats": stats}


@pytest.fixture(scope="module")
def rn18():
  """A ResNet-18 DCv2Model with a small BN head, trained BN statistics and 2 heads of 10 centroids."""
  model = DCv2Model(TrunkArch(18), head_dims=(64, 16))
  v = numpy_init(model, [jnp.zeros((2, 1, 32, 32, 3))])
  v = with_trained_bn(model, v, (4, 64, 64, 3), wrap=lambda x: [x[:, None]])  # crop groups [B, n, S, S, 3]
  centroids = np.random.default_rng(1).normal(size=(2, 10, 16)).astype(np.float32)
  return config_for(18, head_dims=(64, 16)), v, centroids


def trunk_of(v):
  return {"params": v["params"]["trunk"], "batch_stats": v["batch_stats"]["trunk"]}


def our_features(depth, variables, images, width=1, base_width=64):
  return np.asarray(ResNet(TrunkArch(depth, width, base_width)).apply(variables, images, train=False))


def torchvision_features(tv, images):
  tv.fc = torch.nn.Identity()
  tv.eval()
  with torch.no_grad():
    return tv(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()


def load_into_torchvision(arch, sd):
  tv = getattr(torchvision.models, arch)()
  sd = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v)) for k, v in sd.items()}
  result = tv.load_state_dict(sd, strict=False)
  assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
  assert result.unexpected_keys == []
  return tv


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
