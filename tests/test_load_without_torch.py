"""load.py where torch is not installed (the GPU image's Python 3.12 line): a torch file is refused in one line
that says what to do. No torch needed: this file runs in CI's torch-free leg too (test_load.py needs torch)."""
import sys

import pytest


def test_a_torch_file_without_torch_installed_is_one_clear_line(tmp_path, monkeypatch):
  """The GPU image's Python 3.12 line has no CPU torch: a .pth then says what to do, not ModuleNotFoundError."""
  from dcv2_jax import load
  monkeypatch.setitem(sys.modules, "torch", None)          # `import torch` raises ImportError
  path = tmp_path / "weights.pth"
  path.write_bytes(b"whatever")
  with pytest.raises(ValueError, match=r"reading a torch file needs torch .*\.safetensors"):
    load.load_state_dict_file(str(path))
