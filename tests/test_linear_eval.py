"""The linear_eval command (python -m dcv2_jax.linear_eval) on a training workdir."""
import json
import os

from configs import digits
from dcv2_jax import linear_eval


def test_cli_on_a_training_workdir(tmp_path, capsys):
  """The command on a run's workdir (weights, config.json, data) learns the digits: val top-1 well above
  chance (0.1). The run trains one epoch at a gentle LR, which leaves its features well scaled for the
  published protocol's raw-feature Linear layer (at the demo's LR 4.8 they grow to norms of ~600 in one
  epoch and SGD at any LR stays at chance)."""
  from dcv2_jax.trainer import train_and_evaluate
  c = digits.get_config()
  c.data.image_size_digits, c.data.crops = 16, ((16, 2, 0.4, 1.0),)
  c.model.base_width, c.model.head_dims, c.loss.num_clusters = 8, (32, 16), (10, 10, 10)
  c.num_epochs, c.eval_at_end = 1, False
  c.optim.lr, c.optim.warmup_start_lr = 0.3, 0.03
  workdir = str(tmp_path / "run")
  train_and_evaluate(c, workdir)
  record = linear_eval.main(["--workdir", workdir, "--epochs", "8", "--lr", "0.3", "--eval_every_epochs", "1"])
  assert record["epoch"] == 8 and 0.25 < record["val_top1"] <= 1.0        # 0.34 when written
  lines = [json.loads(l) for l in open(os.path.join(workdir, "linear_eval", "metrics.jsonl"))]
  assert [r["epoch"] for r in lines] == list(range(1, 9)) and all("val_top5" in r for r in lines)
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed["linear_eval"]["epoch"] == 8
  assert os.path.isdir(os.path.join(workdir, "linear_eval", "checkpoints", "8"))
