"""What keeps a run going and says what happened: checkpoints, the run log and its last line, metrics, multi-host
start-up and the watch for lost processes, preemption.

  checkpoint.py     orbax saves and restores; damaged checkpoints moved aside; failed saves named
  distributed.py    multi-host start-up, PeerWatch (a lost process named), jit whose programs start together
  preemption.py     SIGTERM: every process saves the same step, then stops
  run_log.py        <workdir>/train.log; a failed run's one last line
  last_words.py     the line of a process that died without a word (a small watcher process)
  metric_writer.py  metrics.jsonl, TensorBoard, progress and ETA
"""
