"""model/multi_crop.py: crops per trunk pass of a crop recipe; DCv2Model's forward against a reference built from its
own trunk and head applied pass by pass with numpy's sample-major reshapes: unit rows [B, C, D], consecutive
equal-size groups in one trunk pass (one set of BatchNorm statistics), the mask repeated per crop."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcv2_jax.model.head import ProjectionHead
from dcv2_jax.model.multi_crop import DCv2Model, crops_per_trunk_pass
from dcv2_jax.model.trunk import ResNet, TrunkArch

ARCH = TrunkArch(18, base_width=4)
HEAD = (16, 8)
B = 4


@pytest.mark.parametrize("crops,passes", [
    (((160, 2, 0.14, 1.0), (96, 4, 0.05, 0.14)), [2, 4]),
    (((224, 2, 0.14, 1.0), (224, 2, 0.05, 0.14)), [4]),
    (((224, 2, 0.14, 1.0),), [2]),
    (((224, 2, 0.14, 1.0), (96, 3, 0.05, 0.14), (96, 1, 0.05, 0.14), (64, 2, 0.05, 0.1)), [2, 4, 2])],
    ids=["2x160+4x96", "2x224+2x224", "2x224", "2x224+3x96+1x96+2x64"])
def test_crops_per_trunk_pass(crops, passes):
  assert crops_per_trunk_pass(crops) == passes


def trunk_calls(model, variables, crops, **kwargs):
  """model.apply(...) and the images of every trunk call, intercepted."""
  seen = []

  def record(next_fun, args, kwargs_, context):
    if isinstance(context.module, ResNet) and context.method_name == "__call__":
      seen.append(np.asarray(args[0]))
    return next_fun(*args, **kwargs_)
  with nn.intercept_methods(record):
    out = model.apply(variables, crops, **kwargs)
  return out, seen


def reference(variables, groups_by_pass, train, mask=None):
  """z [B, C, D] from the model's trunk and head applied separately, one trunk call per list of groups."""
  params, stats = variables["params"], variables["batch_stats"]
  trunk, head = ResNet(ARCH), ProjectionHead(HEAD)
  apply = lambda module, part, x, m: module.apply({"params": params[part], "batch_stats": stats[part]}, x, train,
                                                  m, **({"mutable": ["batch_stats"]} if train else {}))
  feats = []
  for groups in groups_by_pass:
    x = np.concatenate(groups, axis=1)                        # [B, n, S, S, 3]
    n = x.shape[1]
    rows = x.reshape((B * n,) + x.shape[2:])                  # sample-major: sample b's crops are rows b*n..b*n+n-1
    f = apply(trunk, "trunk", rows, None if mask is None else np.repeat(mask, n))
    feats.append(np.asarray(f[0] if train else f).reshape(B, n, -1))
  f = np.concatenate(feats, axis=1)
  c = f.shape[1]
  z = apply(head, "head", f.reshape(B * c, -1), None if mask is None else np.repeat(mask, c))
  z = np.asarray(z[0] if train else z, np.float64)
  return (z / np.linalg.norm(z, axis=-1, keepdims=True)).reshape(B, c, -1)


@pytest.fixture(scope="module")
def model_and_crops():
  rng = np.random.default_rng(0)
  group = lambda n, s: rng.normal(size=(B, n, s, s, 3)).astype(np.float32)
  crops = dict(a16=group(2, 16), b16=group(2, 16), c8=group(3, 8))
  model = DCv2Model(ARCH, HEAD)
  variables = model.init(jax.random.key(0), [crops["a16"], crops["c8"]], train=False)
  return model, variables, crops


def test_unit_rows_sample_major_in_eval_mode(model_and_crops):
  model, variables, crops = model_and_crops
  groups = [crops["a16"], crops["c8"]]
  z, seen = trunk_calls(model, variables, groups, train=False)
  assert z.shape == (B, 2 + 3, HEAD[-1]) and z.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(np.asarray(z, np.float64), axis=-1), 1.0, rtol=1e-5)
  # Two sizes: two trunk passes, each the group's crops sample-major.
  assert [s.shape for s in seen] == [(B * 2, 16, 16, 3), (B * 3, 8, 8, 3)]
  np.testing.assert_array_equal(seen[0], crops["a16"].reshape(B * 2, 16, 16, 3))
  np.testing.assert_array_equal(seen[1], crops["c8"].reshape(B * 3, 8, 8, 3))
  np.testing.assert_allclose(np.asarray(z), reference(variables, [[crops["a16"]], [crops["c8"]]], False),
                             rtol=1e-4, atol=2e-4)


def test_equal_size_groups_share_one_trunk_pass(model_and_crops):
  """Train mode: BatchNorm's statistics are those of the pass, so the output of two groups of one size equals the
  reference with both in one pass (and not two passes); a group of another size in between splits them."""
  model, variables, crops = model_and_crops
  mask = np.array([True, False, True, True])
  groups = [crops["a16"], crops["b16"], crops["c8"]]
  (z, _), seen = trunk_calls(model, variables, groups, train=True, mask=mask, mutable=["batch_stats"])
  assert [s.shape for s in seen] == [(B * 4, 16, 16, 3), (B * 3, 8, 8, 3)]
  np.testing.assert_array_equal(seen[0], np.concatenate([crops["a16"], crops["b16"]], 1).reshape(B * 4, 16, 16, 3))
  one_pass = reference(variables, [[crops["a16"], crops["b16"]], [crops["c8"]]], True, mask)
  np.testing.assert_allclose(np.asarray(z), one_pass, rtol=1e-4, atol=2e-4)
  separate = reference(variables, [[crops["a16"]], [crops["b16"]], [crops["c8"]]], True, mask)
  assert np.abs(np.asarray(z) - separate).max() > 0.1        # the grouping shows in the numbers

  # The same groups with one of another size in between: three passes.
  groups = [crops["a16"], crops["c8"], crops["b16"]]
  (z, _), seen = trunk_calls(model, variables, groups, train=True, mask=mask, mutable=["batch_stats"])
  assert [s.shape[0] for s in seen] == [B * 2, B * 3, B * 2]
  np.testing.assert_allclose(np.asarray(z), reference(variables, [[g] for g in groups], True, mask),
                             rtol=1e-4, atol=2e-4)
