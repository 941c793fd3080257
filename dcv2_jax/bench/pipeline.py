"""`python -m dcv2_jax.bench pipeline`: CPU cost of the input pipeline per sample: how many cores feed one accelerator.

    python -m dcv2_jax.bench pipeline                 # 2x224 and 2x224+6x96, host vs device colour ops
    python -m dcv2_jax.bench pipeline --quick         # tiny run (tests)

Writes a temporary folder of 500x375 JPEGs (~80 KB, smooth colour fields with texture and edges, like
photos) and runs the real Pipeline in the main process, synchronously (num_workers=0, no threads), so
CPU time / samples is the cost on one core. Prints one JSON line per case:
  case: decode (decode only), or crop groups as SIZExCOUNT joined by '+'
  mode: host = colour ops on the CPU (augment.where='host'), device = crops only (colour ops left for the
        accelerator), '-' for decode
  decoder: simplejpeg = sources.decode_image as it is (simplejpeg for the JPEGs it takes, PIL for the rest),
           pil = PIL for every image (as before simplejpeg); --decoders simplejpeg,pil runs each case with both
  samples_per_s_per_core = samples / process CPU seconds; samples_per_s_wall = samples / wall seconds.
Compare with the anchors in perf.md (measured on another machine).
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
from dcv2_jax.data import pipeline as pipeline_lib, sources

DECODERS = ("simplejpeg", "pil")
CROPS = {"2x224": ((224, 2, 0.14, 1.0),), "2x224+6x96": ((224, 2, 0.14, 1.0), (96, 6, 0.05, 0.14)),
         "2x160+4x96": ((160, 2, 0.08, 1.0), (96, 4, 0.05, 0.14))}


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


def _config(root: str, crops, where: str, batch: int):
  c = config_lib.base_config()
  c.data.source, c.data.path, c.data.crops = "image_folder", root, crops
  c.data.num_workers, c.data.threads_per_worker = 0, 0  # synchronous: all work on this thread
  c.batch_size, c.num_epochs, c.augment.where = batch, 1000, where
  return c


def _measure(next_batch, samples: int, batch: int) -> tuple[float, float]:
  next_batch()  # warm-up: first-call costs (imports, caches) are not per-sample costs
  cpu, wall, done = time.process_time(), time.perf_counter(), 0
  while done < samples:
    next_batch()
    done += batch
  return done / max(time.process_time() - cpu, 1e-9), done / max(time.perf_counter() - wall, 1e-9)


def run_case(root: str, case: str, mode: str, samples: int, batch: int) -> dict:
  if case == "decode":
    src = sources.ImageFolderSource(root)
    pos = iter(range(10**12))

    def next_batch():
      for _ in range(batch):
        src[next(pos) % len(src)]
  else:
    p = pipeline_lib.Pipeline(_config(root, CROPS[case], mode, batch), process_index=0, process_count=1)

    def epochs():
      for e in range(10**6):
        yield from p.iterate(e)

    stream = epochs()
    next_batch = lambda: next(stream)
  per_core, wall = _measure(next_batch, samples, batch)
  return dict(case=case, mode=mode if case != "decode" else "-", samples=samples,
              samples_per_s_per_core=round(per_core, 1), samples_per_s_wall=round(wall, 1))


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(prog="python -m dcv2_jax.bench pipeline", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--cases", default="decode,2x224,2x224+6x96",
                  help=f"comma-separated: decode and/or {', '.join(CROPS)}")
  ap.add_argument("--modes", default="host,device", help="comma-separated: host (colour ops on CPU), device")
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
  modes = [m for m in args.modes.split(",") if m]
  decoders = [d for d in args.decoders.split(",") if d]
  for c in cases:
    if c != "decode" and c not in CROPS:
      ap.error(f"unknown case {c!r}")
  for d in decoders:
    if d not in DECODERS:
      ap.error(f"unknown decoder {d!r}")

  results = []
  simplejpeg_on = sources.FAST_JPEG   # False where simplejpeg is missing: then both decoders are PIL
  with tempfile.TemporaryDirectory() as tmp:
    root = args.image_dir or tmp
    kb = write_folder(root, args.num_images, args.width, args.height) if not args.image_dir else None
    common = dict(image=f"{args.width}x{args.height}" if not args.image_dir else root, jpeg_kb=kb and round(kb, 1),
                  cpu=_cpu_name(), cores=os.cpu_count(), batch=args.batch)
    try:
      for case in cases:
        for mode in (["-"] if case == "decode" else modes):
          for decoder in decoders:
            # The pipeline runs in this process (num_workers=0), so the switch reaches every decode_image call.
            sources.FAST_JPEG = simplejpeg_on and decoder == "simplejpeg"
            r = run_case(root, case, mode, args.samples, args.batch)
            r.update(decoder="simplejpeg" if sources.FAST_JPEG else "pil", **common)
            print(json.dumps(r), flush=True)
            results.append(r)
    finally:
      sources.FAST_JPEG = simplejpeg_on
  return results


if __name__ == "__main__":
  main()
