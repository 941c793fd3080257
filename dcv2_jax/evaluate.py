"""The quick evaluation command: weighted kNN and a linear probe on frozen trunk features, plus the cluster
quality of a run's assignments.

    python -m dcv2_jax.evaluate --workdir W                 # weights, config and assignments from W
    python -m dcv2_jax.evaluate --weights model.pth --config configs/x.py --protocol imagenet

Features are extracted once per split (the eval transform: resize + centre crop, no augmentation) and both
kNN and the probe run on them (dcv2_jax/evaluation/quick.py): minutes, a little below the published
numbers, for which `python -m dcv2_jax.linear_eval` trains on augmented crops (hours on ImageNet).

Splits: train features come from `data.split`, test features from `data.eval_split`. The `digits` source
has no official splits; the data pipeline makes a deterministic 80/20 one ('train' / 'validation' or 'test').
Dataset indices are per split, so the train split's indices are the ones the assignment tables use.
Results go to stdout and, with --workdir, to its metrics.jsonl and TensorBoard.
"""
from __future__ import annotations

import argparse
import json
import sys

import jax
from absl import logging

from dcv2_jax import cli, evaluation, load
from dcv2_jax import config as config_lib
from dcv2_jax import sharding as shd
from dcv2_jax.run import distributed
from dcv2_jax.run.metric_writer import MetricWriter


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m dcv2_jax.evaluate", description=__doc__.split("\n")[0])
  cli.add_run_flags(p)
  p.add_argument("--protocol", choices=evaluation.PROTOCOLS, default="auto",
                 help="auto: fast for the digits source, imagenet otherwise")
  p.add_argument("--image_size", type=int, help="eval resolution (default: the data's eval size)")
  p.add_argument("--batch_size", type=int, help="feature-extraction batch per process")
  p.add_argument("--knn_k", type=int)
  p.add_argument("--no_linear", action="store_true", help="kNN only")
  return p.parse_args(argv)


@cli.one_line_errors
def main(argv=None) -> dict:
  args = parse_args(argv)
  weights = cli.weights_of(args)
  cfg = cli.run_config(args)
  distributed.initialize()       # joins the other processes when launched under SLURM / Open MPI / k8s
  logging.set_verbosity(logging.INFO)       # feature-extraction progress
  protocol = evaluation.protocol_for(cfg.data, args.protocol)
  if args.knn_k:
    protocol.knn_k = args.knn_k
  apply_fn, variables = load.load_trunk(weights)
  mean, std = config_lib.normalization(cfg)
  res, arrays = evaluation.evaluate_trunk(apply_fn, variables, cfg.data, protocol=protocol, mesh=shd.make_mesh(),
                                          batch_size=args.batch_size, image_size=args.image_size, mean=mean,
                                          std=std, linear=not args.no_linear, return_features=True)
  res["weights"] = weights
  if args.workdir and "train" in arrays:
    clusters = evaluation.assignment_quality(args.workdir, arrays["train"][1], arrays["train"][2],
                                             list(cfg.loss.num_clusters), write=jax.process_index() == 0)
    if clusters is not None:
      res["clusters"] = clusters
  if jax.process_index() == 0:
    print(json.dumps({"eval": res}, indent=1, default=float))
  if args.workdir:
    writer = MetricWriter(args.workdir, enabled=jax.process_index() == 0)
    writer.write({"eval": res})
    writer.close()
  return res


if __name__ == "__main__":
  main(sys.argv[1:])
