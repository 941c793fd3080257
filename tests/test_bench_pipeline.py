"""The input-pipeline benchmark runs at tiny size and prints one parseable JSON line per case."""
import json

from dcv2_jax.bench import pipeline as benchmark


def test_benchmark_quick_prints_json(capsys):
  results = benchmark.main(["--quick", "--cases", "decode,2x224,2x224+6x96", "--modes", "host,device"])
  lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
  parsed = [json.loads(l) for l in lines]
  assert parsed == results
  assert [(r["case"], r["mode"]) for r in parsed] == [
      ("decode", "-"), ("2x224", "host"), ("2x224", "device"), ("2x224+6x96", "host"), ("2x224+6x96", "device")]
  for r in parsed:
    assert r["samples"] >= 8 and r["samples_per_s_per_core"] > 0 and r["samples_per_s_wall"] > 0
    assert r["image"] == "64x48" and r["cores"] >= 1


def test_benchmark_natural_jpeg_size():
  import numpy as np
  sizes = [len(benchmark.natural_jpeg(np.random.default_rng(i), 500, 375)) / 1024 for i in range(3)]
  assert 60 < np.mean(sizes) < 100  # about 80 KB, like an ImageNet photo


def test_benchmark_runs_each_case_with_each_decoder():
  from dcv2_jax.data import sources
  results = benchmark.main(["--quick", "--cases", "decode,2x224", "--modes", "device", "--decoders", "simplejpeg,pil"])
  assert [(r["case"], r["decoder"]) for r in results] == [
      ("decode", "simplejpeg"), ("decode", "pil"), ("2x224", "simplejpeg"), ("2x224", "pil")]
  assert sources.FAST_JPEG   # the switch is put back
