"""metrics.jsonl and TensorBoard when the disk fails under them: the trainer never blocks on a metric."""
import errno
import json
import threading

import pytest

from dcv2_jax.run.metric_writer import MetricWriter


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")   # the thread's death is the test
def test_a_dead_tensorboard_thread_neither_blocks_the_run_nor_stops_metrics_jsonl(tmp_path):
  """tensorboardX's writer thread dies on its first failed write (ENOSPC) and then its bounded queue (10)
  fills: without the guard, the 11th scalar after that blocks for good (a full-disk run hung so in CI)."""
  writer = MetricWriter(str(tmp_path))
  events = writer._tb._get_file_writer().event_writer

  def full_disk(event):
    raise OSError(errno.ENOSPC, "No space left on device")
  events._ev_writer.write_event = full_disk

  def write_many():
    for step in range(40):
      writer.write({"step": step, "loss": 1.0 / (step + 1), "clusters": {"size_entropy": [0.9, 0.8, 0.7]}})
    writer.close()
  worker = threading.Thread(target=write_many, daemon=True)
  worker.start()
  worker.join(timeout=60)
  assert not worker.is_alive(), "MetricWriter blocked on TensorBoard's dead writer thread"
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines] == list(range(40))
  assert writer._tb is None                       # TensorBoard off, metrics.jsonl on


def test_a_healthy_writer_keeps_tensorboard_and_writes_every_record(tmp_path):
  writer = MetricWriter(str(tmp_path))
  for step in range(30):
    writer.write({"step": step, "loss": float(step), "lr": 0.1})
  assert writer._tb is not None
  writer.close()
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 30
  assert any(p.name.startswith("events") for p in (tmp_path / "tensorboard").iterdir())
