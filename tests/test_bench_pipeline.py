"""The input-pipeline benchmark runs at tiny size and prints one parseable JSON line per case, crops_on and
decoder, side by side."""
import json

import numpy as np

from dcv2_jax.bench import pipeline as benchmark


def test_benchmark_quick_prints_json(capsys):
  results = benchmark.main(["--quick", "--cases", "decode,2x224,2x224+6x96", "--crops_on", "host,device"])
  lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
  parsed = [json.loads(l) for l in lines]
  assert parsed == results
  assert [(r["case"], r["crops_on"]) for r in parsed] == [
      ("decode", "-"), ("2x224", "host"), ("2x224", "device"), ("2x224+6x96", "host"), ("2x224+6x96", "device")]
  for r in parsed:
    assert r["samples"] >= 8 and r["samples_per_s_per_core"] > 0 and r["samples_per_s_wall"] > 0
    assert r["image"] == "64x48" and r["cores"] >= 1
  by = {(r["case"], r["crops_on"]): r for r in parsed}
  # device: the 512 x 512 canvas, 2 boxes, index and label; host: the two 224 px crops, index and label
  assert by["2x224", "device"]["host_to_device_bytes_per_sample"] == 512 * 512 * 3 + 2 * 4 + 2 * 4 * 4 + 4 + 4
  assert by["2x224", "host"]["host_to_device_bytes_per_sample"] == 2 * 224 * 224 * 3 + 4 + 4
  device = by["2x224", "device"]
  assert device["vs_host"] == round(device["samples_per_s_per_core"] / by["2x224", "host"]["samples_per_s_per_core"], 2)
  rate = device["at_h100_rate"]
  assert rate["samples_per_s"] == round(5653 / 2)          # two 224 px images a sample
  assert abs(rate["cores_per_h100"] - rate["samples_per_s"] / device["samples_per_s_per_core"]) < 0.1


def test_benchmark_natural_jpeg_size():
  sizes = [len(benchmark.natural_jpeg(np.random.default_rng(i), 500, 375)) / 1024 for i in range(3)]
  assert 60 < np.mean(sizes) < 100  # about 80 KB, like an ImageNet photo


def test_benchmark_runs_each_case_with_each_decoder():
  from dcv2_jax.data import sources
  results = benchmark.main(["--quick", "--cases", "decode,2x224", "--crops_on", "device", "--decoders", "simplejpeg,pil"])
  assert [(r["case"], r["decoder"]) for r in results] == [
      ("decode", "simplejpeg"), ("decode", "pil"), ("2x224", "simplejpeg"), ("2x224", "pil")]
  assert sources.FAST_JPEG   # the switch is put back
