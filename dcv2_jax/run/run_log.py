"""The run's own log file, and how a failed run ends: with one line from us, last.

`start(workdir)` adds <workdir>/train.log (train.<process>.log on the other processes): every log record with
its full traceback, including those of background threads (orbax's writers, the data workers' feeders) and
of exceptions no thread caught. stderr keeps the progress log and warnings, but third-party error
tracebacks go to the file only: a full disk used to print some 250 tracebacks there.

`fail(line)` ends a failed run: the line goes to the file and to stderr, and the process exits at once
(os._exit) so that no shutdown noise of background threads follows it, and no shutdown barrier of the
distributed runtime waits for a process that is gone.
"""
from __future__ import annotations

import atexit
import faulthandler
import logging as std_logging
import os
import subprocess
import sys
import threading
import traceback

from absl import logging

from dcv2_jax.run import checkpoint, last_words

LOG_FILE = "train.log"
_OURS = (os.sep + "dcv2_jax" + os.sep, os.sep + "train.py")
_state = {"file": None}
# Records for the file only (tracebacks of background threads, of the failure): not propagated to stderr.
_file_only = std_logging.getLogger("dcv2_jax.run.run_log")
_file_only.propagate = False
_file_only.setLevel(std_logging.DEBUG)


class _RunLogFile(std_logging.FileHandler):
  """A log file that goes quiet when its disk is full (the run's own error is then the one to report)."""

  def __init__(self, path: str):
    super().__init__(path)
    self.broken = False

  def emit(self, record):
    if not self.broken:
      try:
        std_logging.FileHandler.emit(self, record)
        self.flush()
      except OSError:
        self.broken = True

  def handleError(self, record):   # called by emit on a failed write: stderr gets no "Logging error"
    self.broken = True

  def flush(self):
    try:
      super().flush()
    except OSError:
      self.broken = True


def log_path(workdir: str, process_index: int = 0) -> str:
  return os.path.join(workdir, LOG_FILE if process_index == 0 else f"train.{process_index}.log")


def _third_party_traceback(record: std_logging.LogRecord) -> bool:
  return (record.levelno >= std_logging.ERROR and record.exc_info is not None
          and not any(part in (record.pathname or "") for part in _OURS))


def start(workdir: str, process_index: int = 0) -> str:
  """Every log record to the run's log file from now on; third-party error tracebacks off stderr."""
  os.makedirs(workdir, exist_ok=True)
  path = log_path(workdir, process_index)
  handler = _RunLogFile(path)
  handler.setFormatter(logging.PythonFormatter())
  std_logging.getLogger().addHandler(handler)
  _file_only.addHandler(handler)
  logging.get_absl_handler().addFilter(lambda record: not _third_party_traceback(record))
  _state["file"] = handler

  def thread_exception(args):   # an exception no thread caught: to the file, not to stderr
    if args.exc_type is not SystemExit:
      _file_only.error("uncaught in thread %s:\n%s", getattr(args.thread, "name", "?"),
                       "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))

  def unraisable(args):         # e.g. a destructor raising during interpreter shutdown
    _file_only.error("unraisable: %s: %s", args.err_msg, args.exc_value)

  threading.excepthook = thread_exception
  sys.unraisablehook = unraisable
  faulthandler.enable(file=handler.stream)      # a native crash's thread dump: to the file, not stderr
  _start_last_words(os.path.join(workdir, checkpoint.CHECKPOINT_DIR), process_index, path)
  return path


def _start_last_words(checkpoints: str, process_index: int, path: str) -> None:
  """The watcher that reports a death this process cannot report itself (last_words.py)."""
  read_fd, write_fd = os.pipe()
  subprocess.Popen([sys.executable, "-I", last_words.__file__, str(read_fd), str(os.getpid()), checkpoints,
                    str(process_index), path], pass_fds=(read_fd,), stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL)
  os.close(read_fd)
  _state["last_words"] = write_fd
  atexit.register(_said_everything)


def _said_everything() -> None:
  """Tells the watcher that this process ends having said what it had to (a normal exit, or fail())."""
  fd = _state.pop("last_words", None)
  if fd is not None:
    try:
      os.write(fd, b"done")
      os.close(fd)
    except OSError:
      pass


def saved_state(workdir: str) -> str:
  """What a stopped run can resume from, as a sentence."""
  return last_words.saved_state(os.path.join(workdir, checkpoint.CHECKPOINT_DIR))


def summary(error: BaseException, workdir: str) -> str:
  """The one line for a run stopped by `error`: what failed, what is saved, how to go on."""
  handler = _state["file"]
  where = log_path(workdir) if handler is None else (
      handler.baseFilename + (", cut short: its disk is full" if handler.broken else ""))
  text = " ".join(str(error).split())
  if isinstance(error, KeyboardInterrupt):
    what = "interrupted"
  elif isinstance(error, checkpoint.CheckpointSaveError):
    return f"error: {text} (details in {where})"
  elif type(error).__module__.startswith("dcv2_jax") or isinstance(error, (ValueError, FileNotFoundError)):
    what = text        # our errors (and bad input) say everything in their message
  else:
    what = f"{type(error).__name__}: {text[:400]}{'...' if len(text) > 400 else ''}"
  return f"error: {what}. {saved_state(workdir)} (details in {where})"


def fail(line: str, code: int = 1, error: BaseException | None = None) -> None:
  """Ends the process: the traceback of `error` to the log file, `line` to the file and stderr, exit `code`."""
  if error is not None:
    _file_only.error("the run stopped:\n%s",
                     "".join(traceback.format_exception(type(error), error, error.__traceback__)))
  _file_only.error("%s", line)
  for handler in std_logging.getLogger().handlers:
    try:
      handler.flush()
    except (OSError, ValueError):
      pass
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  os.write(2, (line + "\n").encode())
  _said_everything()
  os._exit(code)
