"""What the command-line tools share: the run flags (--workdir / --weights / --config / --data.KEY), the
run's config, and turning an expected failure into one line and a non-zero exit instead of a traceback."""
from __future__ import annotations

import argparse
import functools
import os

import ml_collections

from dcv2_jax import config as config_lib

DATA_OVERRIDES = ("source", "path", "name", "split", "eval_split")


def add_run_flags(parser: argparse.ArgumentParser) -> None:
  """--workdir, --weights, --config and the --data.KEY overrides of the evaluation commands."""
  parser.add_argument("--workdir", help="training workdir: weights, config.json, assignments")
  parser.add_argument("--weights", help="anything dcv2_jax.load_trunk accepts (default: --workdir)")
  parser.add_argument("--config", help="config .py (get_config) or .json (default: <workdir>/config.json)")
  for key in DATA_OVERRIDES:
    parser.add_argument(f"--data.{key}", dest=f"data_{key}", help=f"override config data.{key}")


def run_config(args) -> ml_collections.ConfigDict:
  """--config, else <--workdir>/config.json, else base_config(); then the --data.KEY overrides."""
  path = args.config
  if path is None and args.workdir:
    path = os.path.join(args.workdir, "config.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{args.workdir} has no config.json: is it a training workdir? (or give --config)")
  cfg = config_lib.base_config() if path is None else config_lib.load_file(path)
  for key in DATA_OVERRIDES:
    if getattr(args, f"data_{key}", None) is not None:
      cfg.data[key] = getattr(args, f"data_{key}")
  return cfg


def weights_of(args) -> str:
  """--weights, else --workdir (one of them is required)."""
  if not (args.workdir or args.weights):
    raise UsageError("give --workdir (a training run) or --weights (a checkpoint or exported file)")
  path = args.weights or args.workdir
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist")
  return path


class UsageError(ValueError):
  """Bad command-line input."""


# Failures that are the input's fault, not a bug: their message is the whole story.
EXPECTED_ERRORS = (UsageError, config_lib.ConfigError, FileNotFoundError, NotADirectoryError, PermissionError,
                   ValueError)


def one_line_errors(main):
  """main(argv) -> the same, but an expected error ends the process with `error: <message>` (one line on
  stderr, exit status 1) instead of a traceback."""
  @functools.wraps(main)
  def wrapped(argv=None):
    try:
      return main(argv)
    except EXPECTED_ERRORS as e:
      raise SystemExit(f"error: {' '.join(str(e).split()) or type(e).__name__}") from None
  return wrapped
