"""The line a training process cannot write itself: when it dies without a word (the distributed runtime's
C++ abort when the coordinator is gone, a crash in native code, the kernel's out-of-memory killer), this
small watcher process, started by run_log.start, prints what is saved and how to resume, last, on the
same stderr.

Standard library only, run as a file (`python -I last_words.py ...`), so it starts in milliseconds and holds
no device. It ignores SIGINT and SIGTERM (they are for the training process, which saves and says so), and
exits quietly once the training process tells it "done" on the pipe; a parent that vanishes without that
died.
"""
import os
import select
import signal
import sys


def saved_state(directory: str) -> str:
  """What a stopped run can resume from (`directory`: its checkpoints), as a sentence."""
  steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []
  if not steps:
    return "No checkpoint was saved yet (the same command starts the run afresh)"
  return f"The last checkpoint is step {steps[-1]} in {directory}: run the same command to resume"


def main(read_fd: int, parent: int, checkpoints: str, process: int, log_file: str) -> None:
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  while True:
    ready, _, _ = select.select([read_fd], [], [], 0.5)
    if ready:
      data = os.read(read_fd, 64)
      if b"done" in data:
        return
      if not data:            # every write end closed: the process has gone
        break
    if os.getppid() != parent:
      break
  who = f"process {process}" if process >= 0 else "the training process"
  os.write(2, (f"error: {who} died without a word of its own: the distributed runtime aborted it (another "
               f"process, perhaps the coordinator, process 0, was lost), a crash in native code, or the "
               f"kernel killed it (out of memory?); its last messages are above and in {log_file}. "
               f"{saved_state(checkpoints)}.\n").encode())


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5])
