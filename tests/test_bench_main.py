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


def test_compile_without_the_cuda_compiler_says_what_to_install(capsys, monkeypatch):
  """bench compile needs XLA's CUDA compiler (jax's CUDA plugin): where it is missing, one line naming the package,
  after the other arguments were checked."""
  import importlib
  real_import = importlib.import_module

  def no_plugin(name, *args, **kwargs):
    if name.startswith("jax_cuda1"):
      raise ImportError(f"No module named {name!r}")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(importlib, "import_module", no_plugin)
  with pytest.raises(SystemExit, match="--gpu: unknown v100"):
    bench.main(["compile", "--config", "configs/dcv2_2crops.py", "--gpu", "v100"])
  with pytest.raises(SystemExit, match=r"pip install 'jax\[cuda12-local\]'"):
    bench.main(["compile", "--config", "configs/dcv2_2crops.py", "--gpu", "h100"])
  assert capsys.readouterr().out == ""
