"""bench augment at tiny size on CPU: it runs and prints the figures it promises."""
import json

from dcv2_jax import bench


def test_augment_bench_prints_figures(capsys):
  bench.main(["augment", "--quick", "--jitter_orders", "random,fixed"])
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  assert [(r["crops"], r["size"], r["jitter_order"]) for r in lines] == [
      (16, 32, "random"), (16, 32, "fixed"), (48, 16, "random"), (48, 16, "fixed")]
  for r in lines:
    assert r["ms"] > 0
    # the per-512@224 figure scales the time by crop count and pixel count
    assert abs(r["ms_per_512_at_224"] - r["ms"] * 512 / r["crops"] * (224 / r["size"]) ** 2) < 0.01 * r["ms_per_512_at_224"]
