"""The benchmark command (python -m dcv2_jax.bench): bad input is one line before anything runs."""
import pytest

from dcv2_jax import bench


def test_bad_input_is_one_line_before_anything_runs(capsys):
  for argv, part in ((["step", "--crops", "2x224,bogus"], "--crops: unknown bogus"),
                     (["kmeans", "--kmeans_dtypes", "float64"], "--kmeans_dtypes: unknown float64"),
                     (["assign", "--blocks", "128x128"], "--blocks: 128x128 is not"),
                     (["step", "--batch", "0"], "--batch must be > 0")):
    with pytest.raises(SystemExit, match=part):
      bench.main(argv)
  assert capsys.readouterr().out == ""        # no case ran
