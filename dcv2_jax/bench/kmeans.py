"""`python -m dcv2_jax.bench kmeans` and `assign`: k-means of all heads at ImageNet scale as the trainer runs it,
and one nearest-centroid pass, XLA's matmul + argmax next to the fused Pallas kernel's block configurations."""
from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from dcv2_jax import kmeans, kmeans_kernel, memory_bank
from dcv2_jax.bench.report import emit, guarded, peak_memory_gib
from dcv2_jax.conventions import l2_normalize
from dcv2_jax.sharding import make_mesh


def cluster_all_heads(n: int, dim: int, heads: int, k: int, iters: int, chunk: int, dtype: str, batch: int,
                      sums: str = "scatter", assign: str = "xla") -> dict:
  """All heads as the trainer runs them (kmeans.cluster_heads on a sharded bank of ~n rows)."""
  mesh = make_mesh()
  steps = max(1, n // batch)
  make = jax.jit(lambda key: memory_bank.MemoryBank(
      z=l2_normalize(jax.random.normal(key, (2, steps, batch, dim))),
      index=jnp.arange(steps * batch, dtype=jnp.int32).reshape(steps, batch)),
      out_shardings=memory_bank.bank_shardings(mesh))
  bank = make(jax.random.key(0))
  settings = kmeans.KMeansSettings(chunk_size=chunk, dtype=dtype, sums=sums, assign=assign)
  run = jax.jit(lambda b, key: kmeans.cluster_heads(key, b, (k,) * heads, iters, steps * batch, settings, mesh)[:2])
  t0 = time.perf_counter()
  jax.block_until_ready(run(bank, jax.random.key(1)))
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(3):
    t0 = time.perf_counter()
    jax.block_until_ready(run(bank, jax.random.key(2 + i)))
    times.append(time.perf_counter() - t0)
  return {"rows": steps * batch, "dim": dim, "heads": heads, "clusters": k, "iters": iters, "chunk": chunk,
          "dtype": dtype, "sums": sums, "assign": assign, "seconds": round(min(times), 4),
          "compile_s": round(compile_s, 1), "peak_mem_gb": peak_memory_gib()}


def one_pass(n: int, dim: int, k: int, dtype: str, configs, steps: int) -> list[dict]:
  """One nearest-centroid pass (k-means runs 33 of them for 3 heads x 11 assignment steps): XLA's matmul +
  argmax in lloyd's chunks of 65,536 rows next to the fused kernel at each (block_rows, block_k, num_warps,
  num_stages) in `configs`. Every case scores the same rows: n rounded down to whole chunks (1,245,184 of
  1,281,167 at ImageNet scale, so no case pays for padding); kmeans_3_heads_s scales to all n rows."""
  chunk = min(n, 65536)
  rows = n // chunk * chunk
  x = l2_normalize(jax.random.normal(jax.random.key(0), (rows, dim))).astype(dtype)
  c = l2_normalize(jax.random.normal(jax.random.key(1), (k, dim)))
  xla = jax.jit(lambda x, c: jax.lax.map(
      lambda xs: kmeans.nearest(xs[None], c.astype(x.dtype), kmeans.KMeansSettings(), None), x.reshape(-1, chunk, dim)))
  cases = [("xla", xla)] + [
      (f"pallas {br}x{bk} w{nw} s{ns}",
       jax.jit(lambda x, c, cfg=(br, bk, nw, ns): kmeans_kernel.nearest(
           x, c, block_rows=cfg[0], block_k=cfg[1], num_warps=cfg[2], num_stages=cfg[3])))
      for br, bk, nw, ns in configs]
  out, ref = [], None
  for name, fn in cases:
    record = {"bench": "assign", "rows": rows, "dim": dim, "clusters": k, "dtype": dtype, "method": name}
    try:
      labels = jax.block_until_ready(fn(x, c))[0]
      t0 = time.perf_counter()
      for _ in range(steps):
        jax.block_until_ready(fn(x, c))
      ms = (time.perf_counter() - t0) / steps * 1e3
      labels = np.asarray(labels).reshape(-1)
      record.update(ms=round(ms, 3), kmeans_3_heads_s=round(ms * 33 / 1e3 * n / rows, 3))
      if name == "xla":
        ref = labels
      elif ref is not None:        # TF32 may flip a few near-ties between the two
        record["agree_with_xla"] = round(float((labels == ref).mean()), 5)
    except Exception as e:  # pylint: disable=broad-except  (a configuration the compiler rejects: report, go on)
      record["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    out.append(emit(record))
  return out


def add_arguments(parser, what: str) -> None:
  parser.add_argument("--kmeans_rows", type=int, default=1_281_167)
  parser.add_argument("--kmeans_dtypes", default="float32,bfloat16")
  if what == "kmeans":
    parser.add_argument("--kmeans_sums", default="scatter,onehot")
    parser.add_argument("--kmeans_assign", default="xla,pallas",
                        help="xla (matmul + argmax), pallas (fused kernel; interpreted, slowly, off GPU)")
    parser.add_argument("--chunk", type=int, default=65536)
  else:
    parser.add_argument("--blocks", default="128x128x8x2,64x128x4x2,128x64x4x3,256x64x8x3",
                        help="fused-kernel configs block_rows x block_k x num_warps x num_stages")


def check_arguments(args) -> dict:
  """The comma-separated choices of args (the caller reports unknown ones); raises on a malformed --blocks."""
  from dcv2_jax import cli  # pylint: disable=g-import-not-at-top
  bad = [b for b in getattr(args, "blocks", "").split(",") if b and not re.fullmatch(r"\d+x\d+x\d+x\d+", b)]
  if bad:
    raise cli.UsageError(f"--blocks: {', '.join(bad)} is not block_rows x block_k x num_warps x num_stages, "
                         "e.g. 128x128x8x2")
  choices = {"--kmeans_dtypes": (args.kmeans_dtypes, kmeans.DTYPES)}
  if hasattr(args, "kmeans_sums"):
    choices.update({"--kmeans_sums": (args.kmeans_sums, kmeans.SUMS),
                    "--kmeans_assign": (args.kmeans_assign, kmeans.ASSIGN)})
  return choices


def run_kmeans(args) -> list[dict]:
  rows, k, batch = (4096, 32, 256) if args.quick else (args.kmeans_rows, 3000, 4096)
  out = []
  for assign in args.kmeans_assign.split(","):
    for dtype in args.kmeans_dtypes.split(","):
      for sums in args.kmeans_sums.split(","):
        out.append(emit({"bench": "kmeans", "assign": assign, "dtype": dtype, "sums": sums, **guarded(
            lambda: cluster_all_heads(rows, 128, 3, k, 10, min(args.chunk, rows), dtype, batch, sums, assign))}))
  return out


def run_assign(args) -> list[dict]:
  rows, k = (512, 40) if args.quick else (args.kmeans_rows, 3000)
  configs = [(16, 32, 4, 2)] if args.quick else [tuple(int(v) for v in b.split("x")) for b in args.blocks.split(",") if b]
  return [r for dtype in args.kmeans_dtypes.split(",") for r in one_pass(rows, 128, k, dtype, configs,
                                                                        2 if args.quick else 5)]
