"""Train DeepClusterV2:  python train.py --config=configs/dcv2_2crops.py --workdir=/path/to/run

Any config value can be overridden, e.g. --config.loss.temperature=0.2 --config.num_epochs=100.
Running the same command again resumes from the newest checkpoint in --workdir.
Multi-host: start one process per host under SLURM / Open MPI / Kubernetes (detected), or pass
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (see README).

A run that stops for any reason ends with one line from us (what failed, what is saved, how to resume);
the full log with every traceback is <workdir>/train.log.
"""
import logging as std_logging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dcv2_jax import config as config_lib
from dcv2_jax.run import distributed, run_log

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics.jsonl, train.log and TensorBoard events go.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id.")
flags.DEFINE_string("local_device_ids", None, "Multi-host: comma-separated local devices for this process.")
flags.DEFINE_float("peer_timeout", distributed.DEFAULT_PEER_TIMEOUT,
                   "Multi-host: seconds without a heartbeat from another process before it counts as lost and "
                   "every other process stops with a message (JAX's own health check gets twice this).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS
# Stopped by the scheduler's SIGTERM after saving a checkpoint: 128 + SIGTERM, as if the signal had ended
# the process, so job scripts do not take a preempted run for a finished one.
PREEMPTED_EXIT_CODE = 143
# A collective that failed because a peer went away (gloo on CPU; on GPUs NCCL blocks instead, and the
# PeerWatch notices).
_CONNECTION_LOST = re.compile(r"gloo|connection (reset|refused|closed)|peer|unavailable|heartbeat|socket", re.I)


def lost_process_line(lost, workdir) -> str:
  return (f"error: lost process {', '.join(map(str, lost))} (no heartbeat for {FLAGS.peer_timeout:.0f}s, or its "
          f"connection broke: a crashed or preempted host, or the network), so process "
          f"{distributed.jax.process_index()} stops too. {run_log.saved_state(workdir)} on every host.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.claim_device_memory()
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         FLAGS.local_device_ids, FLAGS.peer_timeout)
  # After initialize: nothing may touch the devices before it.
  from dcv2_jax import trainer  # pylint: disable=g-import-not-at-top
  workdir, process = FLAGS.workdir, distributed.jax.process_index()
  logging.set_verbosity(logging.INFO)
  # orbax narrates every save at INFO; keep its warnings, drop the chatter from the progress log.
  logging.get_absl_handler().addFilter(lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname)
  run_log.start(workdir, process)
  with distributed.PeerWatch(FLAGS.peer_timeout, lambda lost: run_log.fail(lost_process_line(lost, workdir))) as watch:
    try:
      summary = trainer.train_and_evaluate(FLAGS.config, workdir)
    except config_lib.ConfigError as e:
      run_log.fail(f"error: {' '.join(str(e).split())}", 2, e)
    except BaseException as e:  # pylint: disable=broad-except  (any crash: our line last, then exit)
      if distributed.jax.process_count() > 1 and _CONNECTION_LOST.search(str(e)):
        lost = watch.wait_for_lost(2 * FLAGS.peer_timeout)
        if lost:
          run_log.fail(lost_process_line(lost, workdir), 1, e)
        # Every peer still beats: no process was lost, and the error's own line says what failed.
      run_log.fail(run_log.summary(e, workdir), 1, e)
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
