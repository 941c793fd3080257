"""The evaluate command (python -m dcv2_jax.evaluate) on a workdir, with stand-ins for load_trunk and eval_batches;
bad input to the commands ends in one line."""
import json

import numpy as np
import pytest
from sklearn.datasets import load_digits

from dcv2_jax import evaluate
from eval_helpers import _digits_cfg, _digits_split, _fake_eval_batches, _tiny_trunk


def test_cli_workdir(tmp_path, monkeypatch, capsys):
  import dcv2_jax.data
  import dcv2_jax.load
  apply_fn, variables = _tiny_trunk(16)
  monkeypatch.setattr(dcv2_jax.load, "load_trunk", lambda path: (apply_fn, variables))
  monkeypatch.setattr(dcv2_jax.data, "eval_batches", _fake_eval_batches)
  wd = tmp_path / "wd"
  (wd / "assignments").mkdir(parents=True)
  (wd / "config.json").write_text(_digits_cfg().to_json())
  d = load_digits()
  n = len(d.target)
  table = np.stack([d.target, np.random.default_rng(0).integers(0, 10, n)]).astype(np.int32)
  table[:, :7] = -100
  np.savez(wd / "assignments" / "epoch_0001.npz", assignments=np.zeros_like(table), index=np.arange(n))
  np.savez(wd / "assignments" / "epoch_0002.npz", assignments=table, index=np.arange(n))

  res = evaluate.main(["--workdir", str(wd), "--no_linear", "--batch_size", "128"])
  assert res["protocol"] == "fast" and "linear_top1" not in res and res["knn_top1"] > 0.5
  cl = res["clusters"]
  assert cl["file"] == "epoch_0002.npz" and cl["labelled"] == 1437
  # Head 0 is the label itself (on the train split); head 1 is random.
  assert cl["nmi_labels"][0] == pytest.approx(1.0) and cl["purity_labels"][0] == pytest.approx(1.0)
  assert cl["nmi_labels"][1] < 0.1
  lines = (wd / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[-1])["eval"]["knn_top1"] == res["knn_top1"]
  assert '"eval"' in capsys.readouterr().out
  with np.load(wd / "assignments" / "latest_with_labels.npz") as f:
    train_rows = _digits_split("train")[2]
    want = np.full(n, -1)
    want[train_rows] = d.target[train_rows]
    np.testing.assert_array_equal(f["labels"], want)
    np.testing.assert_array_equal(f["assignments"], table)


def test_bad_input_to_the_commands_is_one_line(tmp_path):
  """evaluate, linear_eval and export: a wrong path or a file that holds no weights ends with one line
  naming the problem and a non-zero exit, in process (SystemExit) and as a command (no traceback)."""
  import subprocess
  import sys
  from dcv2_jax import export, linear_eval
  junk = tmp_path / "junk.safetensors"          # safetensors: the same check with torch installed or not
  junk.write_bytes(b"not a state dict")
  (tmp_path / "empty").mkdir()
  cases = [(evaluate.main, ["--weights", str(junk)], "is not a weights file this tool reads"),
           (evaluate.main, ["--workdir", str(tmp_path / "missing")], "does not exist"),
           (evaluate.main, ["--workdir", str(tmp_path / "empty")], "has no config.json"),
           (evaluate.main, [], "give --workdir"),
           (linear_eval.main, ["--workdir", str(tmp_path / "missing")], "does not exist"),
           (export.main, ["--workdir", str(tmp_path / "empty"), "--format", "swav", "--out", str(tmp_path / "x.pth")],
            "not a dcv2-jax workdir")]
  for main, argv, part in cases:
    with pytest.raises(SystemExit) as e:
      main(argv)
    assert str(e.value).startswith("error: ") and part in str(e.value) and "\n" not in str(e.value)
  r = subprocess.run([sys.executable, "-m", "dcv2_jax.evaluate", "--weights", str(junk)], capture_output=True,
                     text=True, timeout=300)
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "is not a weights file" in r.stderr
