"""Train DeepClusterV2:  python train.py --config=configs/dcv2_2crops.py --workdir=/path/to/run

Any config value can be overridden, e.g. --config.loss.temperature=0.2 --config.num_epochs=100.
Running the same command again resumes from the newest checkpoint in --workdir.
Multi-host: start one process per host under SLURM / Open MPI / Kubernetes (detected), or pass
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (see README).
"""
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dcv2_jax import config as config_lib
from dcv2_jax import distributed

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics.jsonl and TensorBoard events go.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id.")
flags.DEFINE_string("local_device_ids", None, "Multi-host: comma-separated local devices for this process.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS
# Stopped by the scheduler's SIGTERM after saving a checkpoint: 128 + SIGTERM, as if the signal had ended
# the process, so job scripts do not take a preempted run for a finished one.
PREEMPTED_EXIT_CODE = 143


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         FLAGS.local_device_ids)
  # After initialize: nothing may touch the devices before it.
  from dcv2_jax import trainer  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  # orbax narrates every save at INFO; keep its warnings, drop the chatter from the progress log.
  logging.get_absl_handler().addFilter(lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname)
  try:
    summary = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except config_lib.ConfigError as e:
    sys.exit(f"error: {e}")
  if summary.get("preempted"):
    sys.exit(PREEMPTED_EXIT_CODE)


def check_config_overrides(argv) -> None:
  """Unknown --config.KEY overrides: exit with the list of valid keys (before ml_collections' traceback)."""
  paths = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  keys = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  if not paths or not keys:
    return
  try:
    config = config_lib.load_file(paths[-1])
  except (OSError, AttributeError):
    return   # let config_flags report the bad path
  message = config_lib.unknown_keys_message(config, keys)
  if message:
    sys.exit(f"error: {message}")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # configs/ import each other
  check_config_overrides(sys.argv[1:])
  app.run(main)
