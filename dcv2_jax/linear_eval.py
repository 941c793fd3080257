"""The published linear evaluation command (dcv2_jax/evaluation/linear_on_crops.py): a Linear layer trained
on augmented crops of the frozen trunk, 100 epochs, validated after each.

    python -m dcv2_jax.linear_eval --workdir /runs/dcv2_2crops          # weights and data from the run
    python -m dcv2_jax.linear_eval --weights dcv2_rn50.pth --config configs/dcv2_2crops.py --out /runs/le

Every protocol value is a flag (--epochs, --lr, --batch_size, ...). It checkpoints every epoch into <out>
(default <workdir>/linear_eval) and resumes by default; --stop_after_epoch N splits it over time-limited
jobs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
from absl import logging

from dcv2_jax import cli, evaluation, load
from dcv2_jax import config as config_lib
from dcv2_jax.run import distributed

_PROTOCOL_FLAGS = ("epochs", "batch_size", "lr", "final_lr", "weight_decay", "momentum", "nesterov", "crop_size",
                   "crop_scale", "flip_p", "eval_every_epochs", "seed")


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m dcv2_jax.linear_eval", description=__doc__.split("\n")[0])
  cli.add_run_flags(p)
  p.add_argument("--out", help="where checkpoints and metrics go (default: <workdir>/linear_eval)")
  defaults = evaluation.linear_protocol()
  for key in _PROTOCOL_FLAGS:
    value = defaults[key]
    kind = {bool: lambda v: v.lower() in ("1", "true", "yes"), tuple: lambda v: tuple(float(x) for x in v.split(","))
            }.get(type(value), type(value))
    p.add_argument(f"--{key}", type=kind, default=None, help=f"default {value}")
  p.add_argument("--stop_after_epoch", type=int, help="stop after this epoch (the same command continues)")
  return p.parse_args(argv)


@cli.one_line_errors
def main(argv=None) -> dict:
  args = parse_args(argv)
  weights = cli.weights_of(args)
  out = args.out or (os.path.join(args.workdir, "linear_eval") if args.workdir else None)
  if out is None:
    raise cli.UsageError("give --out (or --workdir)")
  run_cfg = cli.run_config(args)
  distributed.initialize()
  logging.set_verbosity(logging.INFO)       # the per-epoch progress lines (hours on ImageNet)
  protocol = evaluation.linear_protocol()
  for key in _PROTOCOL_FLAGS:
    if getattr(args, key) is not None:
      protocol[key] = getattr(args, key)
  if args.crop_size is None:     # the evaluation size of the run's data: e.g. 32 px for CIFAR, 224 for ImageNet
    protocol.crop_size = config_lib.eval_view(run_cfg.data)[0]
  apply_fn, variables = load.load_trunk(weights)
  mean, std = config_lib.normalization(run_cfg)
  record = evaluation.train_linear(apply_fn, variables, run_cfg.data, out, protocol, mean=mean, std=std,
                                   stop_after_epoch=args.stop_after_epoch)
  if jax.process_index() == 0:
    print(json.dumps({"linear_eval": record}, default=float))
  return record


if __name__ == "__main__":
  main(sys.argv[1:])
