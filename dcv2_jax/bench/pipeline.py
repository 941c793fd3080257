"""`python -m dcv2_jax.bench pipeline`: CPU cost of the input pipeline per sample: how many cores feed one accelerator.

    python -m dcv2_jax.bench pipeline                 # every recipe's crops, cut on the host vs on the device
    python -m dcv2_jax.bench pipeline --quick         # tiny run (tests)

Writes a temporary folder of 500x375 JPEGs (~80 KB, smooth colour fields with texture and edges, like
photos) and runs the real Pipeline in the main process, synchronously (num_workers=0, no threads), so
CPU time / samples is the cost on one core. The colour ops run on the accelerator in every case (the default).
Prints one JSON line per case, crops_on and decoder:
  case: decode (decode only), or a recipe's crop groups as SIZExCOUNT joined by '+'
  crops_on: host = the CPU decodes and cuts the crops (PIL); device = the CPU decodes and places the image on the
            canvas with its crop boxes, the step cuts the crops (data.crops_on=device); '-' for decode
  decoder: simplejpeg = sources.decode_image as it is (simplejpeg for the JPEGs it takes, PIL for the rest),
           pil = PIL for every image (as before simplejpeg); --decoders simplejpeg,pil runs each case with both
  samples_per_s_per_core = samples / process CPU seconds; samples_per_s_wall = samples / wall seconds;
  vs_host: device over host of the same run, case and decoder;
  host_to_device_bytes_per_sample: what a sample sends to the accelerator; at_h100_rate: the samples/s of one H100
  at the plain Flax ResNet-50 rate (perf.md: 5,653 224 px images/s; a sample weighs its crops by (size/224)^2),
  the cores that takes (cores_per_h100) and the host-to-device GB/s.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time

import numpy as np
from PIL import Image

from dcv2_jax import config as config_lib
from dcv2_jax.bench import RECIPE_CROPS
from dcv2_jax.bench.report import H100_ANCHOR_IMG224_PER_S, images224
from dcv2_jax.data import pipeline as pipeline_lib, sources

DECODERS = ("simplejpeg", "pil")
CROPS = RECIPE_CROPS


def natural_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
  """A photo-like JPEG: a smooth colour field (bicubic-upscaled coarse noise), a few hard-edged shapes and
  sensor-like grain; about 80 KB at 500x375 and quality 90, which decodes like a typical ImageNet image."""
  coarse = rng.random((max(2, height // 40), max(2, width // 40), 3)) * 255
  img = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BICUBIC)
  x = np.asarray(img).astype(np.float32)
  for _ in range(6):  # shapes with sharp edges
    y0, x0 = rng.integers(0, height), rng.integers(0, width)
    h, w = rng.integers(height // 10, height // 3), rng.integers(width // 10, width // 3)
    x[y0:y0 + h, x0:x0 + w] = 0.5 * x[y0:y0 + h, x0:x0 + w] + 0.5 * rng.random(3) * 255
  x += rng.normal(0, 14, x.shape)
  buf = io.BytesIO()
  Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
  return buf.getvalue()


def write_folder(root: str, num_images: int, width: int, height: int, seed: int = 0) -> float:
  """num_images JPEGs in root/class0; returns their mean size in KB."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "class0"), exist_ok=True)
  sizes = []
  for i in range(num_images):
    data = natural_jpeg(rng, width, height)
    sizes.append(len(data))
    with open(os.path.join(root, "class0", f"{i:05d}.jpg"), "wb") as f:
      f.write(data)
  return float(np.mean(sizes)) / 1024


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _config(root: str, crops, crops_on: str, batch: int):
  c = config_lib.base_config()
  c.data.source, c.data.path, c.data.crops, c.data.crops_on = "image_folder", root, crops, crops_on
  c.data.num_workers, c.data.threads_per_worker = 0, 0  # synchronous: all work on this thread
  c.batch_size, c.num_epochs = batch, 1000
  return c


def sample_bytes(crops, crops_on: str) -> int:
  """Bytes one sample sends to the accelerator (train_batch_shapes)."""
  canvas = pipeline_lib.canvas_size(_config("", crops, crops_on, 1).data)
  shapes = pipeline_lib.train_batch_shapes(crops, 1, crops_on, canvas)
  flat = [sd for v in shapes.values() for sd in (v if isinstance(v, list) else [v])]
  return int(sum(np.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in flat))


def at_h100_rate(crops, samples_per_s_per_core: float, nbytes: int) -> dict:
  """What one H100 at the plain Flax ResNet-50 rate consumes of this case: samples/s, CPU cores, GB/s."""
  rate = H100_ANCHOR_IMG224_PER_S / images224(crops)
  return {"samples_per_s": round(rate), "cores_per_h100": round(rate / samples_per_s_per_core, 1),
          "host_to_device_gb_per_s": round(rate * nbytes / 1e9, 2)}


def _measure(next_batch, samples: int, batch: int) -> tuple[float, float]:
  next_batch()  # warm-up: first-call costs (imports, caches) are not per-sample costs
  cpu, wall, done = time.process_time(), time.perf_counter(), 0
  while done < samples:
    next_batch()
    done += batch
  return done / max(time.process_time() - cpu, 1e-9), done / max(time.perf_counter() - wall, 1e-9)


def run_case(root: str, case: str, crops_on: str, samples: int, batch: int) -> dict:
  if case == "decode":
    src = sources.ImageFolderSource(root)
    pos = iter(range(10**12))

    def next_batch():
      for _ in range(batch):
        src[next(pos) % len(src)]
  else:
    p = pipeline_lib.Pipeline(_config(root, CROPS[case], crops_on, batch), process_index=0, process_count=1)

    def epochs():
      for e in range(10**6):
        yield from p.iterate(e)

    stream = epochs()
    next_batch = lambda: next(stream)
  per_core, wall = _measure(next_batch, samples, batch)
  out = dict(case=case, crops_on=crops_on if case != "decode" else "-", samples=samples,
             samples_per_s_per_core=round(per_core, 1), samples_per_s_wall=round(wall, 1))
  if case != "decode":
    nbytes = sample_bytes(CROPS[case], crops_on)
    out.update(host_to_device_bytes_per_sample=nbytes, at_h100_rate=at_h100_rate(CROPS[case], per_core, nbytes))
  return out


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(prog="python -m dcv2_jax.bench pipeline", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--cases", default="decode," + ",".join(CROPS),
                  help=f"comma-separated: decode and/or {', '.join(CROPS)}")
  ap.add_argument("--crops_on", default="host,device", help="comma-separated: host (the CPU cuts the crops), device")
  ap.add_argument("--samples", type=int, default=512, help="samples timed per case")
  ap.add_argument("--batch", type=int, default=32, help="batch size")
  ap.add_argument("--num-images", type=int, default=64, help="JPEGs written (the epoch cycles over them)")
  ap.add_argument("--width", type=int, default=500)
  ap.add_argument("--height", type=int, default=375)
  ap.add_argument("--image-dir", default="", help="use this image folder instead of writing one")
  ap.add_argument("--decoders", default="simplejpeg",
                  help=f"comma-separated: {', '.join(DECODERS)}; every case runs with each, one after the other")
  ap.add_argument("--quick", action="store_true",
                  help="tiny smoke run: 8 images of 64x48, 8 samples per case, batch 4")
  args = ap.parse_args(argv)
  if args.quick:
    args.samples, args.batch, args.num_images, args.width, args.height = 8, 4, 8, 64, 48
  if args.num_images < args.batch:
    ap.error("--num-images must be at least --batch")
  cases = [c for c in args.cases.split(",") if c]
  where = [m for m in args.crops_on.split(",") if m]
  decoders = [d for d in args.decoders.split(",") if d]
  for c in cases:
    if c != "decode" and c not in CROPS:
      ap.error(f"unknown case {c!r}")
  for d in decoders:
    if d not in DECODERS:
      ap.error(f"unknown decoder {d!r}")
  for m in where:
    if m not in ("host", "device"):
      ap.error(f"--crops_on: unknown {m!r}; choose from host, device")

  results = []
  simplejpeg_on = sources.FAST_JPEG   # False where simplejpeg is missing: then both decoders are PIL
  with tempfile.TemporaryDirectory() as tmp:
    root = args.image_dir or tmp
    kb = write_folder(root, args.num_images, args.width, args.height) if not args.image_dir else None
    common = dict(image=f"{args.width}x{args.height}" if not args.image_dir else root, jpeg_kb=kb and round(kb, 1),
                  cpu=_cpu_name(), cores=os.cpu_count(), batch=args.batch)
    try:
      for case in cases:
        for decoder in decoders:
          host = None
          for crops_on in (["-"] if case == "decode" else where):
            # The pipeline runs in this process (num_workers=0), so the switch reaches every decode_image call.
            sources.FAST_JPEG = simplejpeg_on and decoder == "simplejpeg"
            r = run_case(root, case, crops_on, args.samples, args.batch)
            r.update(decoder="simplejpeg" if sources.FAST_JPEG else "pil", **common)
            if crops_on == "host":
              host = r
            elif crops_on == "device" and host is not None:
              r["vs_host"] = round(r["samples_per_s_per_core"] / host["samples_per_s_per_core"], 2)
            print(json.dumps(r), flush=True)
            results.append(r)
    finally:
      sources.FAST_JPEG = simplejpeg_on
  return results


if __name__ == "__main__":
  main()
