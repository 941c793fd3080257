"""evaluation/quick.py: evaluate_trunk (features + kNN + probe) with stand-ins for load_trunk and eval_batches (a
tiny flax network, generators of dict batches), and end to end on the real data pipeline's digits source."""
import json

from dcv2_jax import evaluation as ev
from eval_helpers import NORM, _digits_cfg, _fake_eval_batches, _tiny_trunk


def test_evaluate_trunk_with_stand_ins():
  apply_fn, variables = _tiny_trunk(16)
  cfg = _digits_cfg()
  res, arrays = ev.evaluate_trunk(apply_fn, variables, cfg.data, protocol=ev.fast_protocol(),
                                  batch_size=256, batches_fn=_fake_eval_batches, return_features=True,
                                  progress=False, **NORM)
  assert res["num_train"] == 1437 and res["num_test"] == 360 and res["feature_dim"] == 8
  assert res["knn_top1"] > 0.5 and res["linear_top1"] > 0.3   # random 8-d features; chance is 0.1
  assert arrays["train"][0].shape == (1437, 8)
  json.dumps(res)
  cfg.data.eval_split = ""
  assert "skipped" in ev.evaluate_trunk(apply_fn, variables, cfg.data, batches_fn=_fake_eval_batches, **NORM)


def test_evaluate_trunk_digits_end_to_end():
  """The real data pipeline's digits source + a random-init tiny network."""
  apply_fn, variables = _tiny_trunk(16)
  cfg = _digits_cfg()
  res = ev.evaluate_trunk(apply_fn, variables, cfg.data, protocol=ev.fast_protocol(), batch_size=256,
                          image_size=16, progress=False, **NORM)
  assert res["num_train"] + res["num_test"] == 1797 and res["num_test"] > 0
  assert res["knn_top1"] > 0.3
