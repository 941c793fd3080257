"""bench kmeans and bench assign at tiny sizes on CPU: they run and print the figures they promise; a failing case
is reported and the rest still run."""
import json

from dcv2_jax import bench
from dcv2_jax.bench import kmeans as kmeans_bench


def test_kmeans_bench_prints_figures(capsys):
  bench.main(["kmeans", "--quick", "--kmeans_dtypes", "float32"])
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  assert sorted((r["assign"], r["sums"]) for r in lines) == [("pallas", "onehot"), ("pallas", "scatter"),
                                                             ("xla", "onehot"), ("xla", "scatter")]
  line = lines[0]
  assert line["bench"] == "kmeans" and line["heads"] == 3 and line["seconds"] > 0 and line["rows"] == 4096


def test_assign_bench_compares_kernel_with_xla(capsys):
  bench.main(["assign", "--quick", "--kmeans_dtypes", "float32"])
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  assert [r["method"] for r in lines] == ["xla", "pallas 16x32 w4 s2"]
  assert all(r["ms"] > 0 for r in lines) and lines[1]["agree_with_xla"] == 1.0 and "agree_with_xla" not in lines[0]


def test_a_failing_case_is_reported_and_the_rest_still_run(capsys, monkeypatch):
  """A case that fails (here the fused kernel, as a compiler could reject it) prints an error line; the next runs."""
  real = kmeans_bench.cluster_all_heads

  def rejects_the_kernel(*args):
    if args[-1] == "pallas":
      raise ValueError("the compiler rejected the kernel")
    return real(*args)

  monkeypatch.setattr(kmeans_bench, "cluster_all_heads", rejects_the_kernel)
  bench.main(["kmeans", "--quick", "--kmeans_dtypes", "float32", "--kmeans_sums", "scatter",
              "--kmeans_assign", "pallas,xla"])
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  assert [r["assign"] for r in lines] == ["pallas", "xla"]
  assert "ValueError" in lines[0]["error"] and "seconds" not in lines[0]
  assert lines[1]["seconds"] > 0 and "error" not in lines[1]
