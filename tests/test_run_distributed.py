"""Multi-process plumbing: a program that one process reaches late still runs (distributed.jit), and the
watch tells a lost peer from a collective that failed while every peer lived (PeerWatch.wait_for_lost)."""
import subprocess
import sys
import threading
import time

import portpicker
import pytest

from dcv2_jax.run import distributed
from run_helpers import REPO, env

# Process 1 reaches the program 35 s after process 0, as a host that compiles slower would (on 2 loaded
# cores a compile can take half a minute longer). With a plain jax.jit process 0 waits in the all-reduce,
# and gloo gives up after 30 s ("Gloo context initialization failed: DEADLINE_EXCEEDED", measured with jax
# 0.10.2 and 0.12.0.1); distributed.jit meets at a barrier first.
LATE_PROCESS = """
import sys, time
import jax, jax.numpy as jnp, numpy as np
from dcv2_jax.run import distributed
pid, port = int(sys.argv[1]), sys.argv[2]
distributed.initialize(f"127.0.0.1:{port}", 2, pid, peer_timeout=60)
mesh = jax.make_mesh((2,), ("data",))
rows = jax.make_array_from_process_local_data(jax.NamedSharding(mesh, jax.P("data")), np.full((3,), pid + 1.0))
total = distributed.jit(jnp.sum, out_shardings=jax.NamedSharding(mesh, jax.P()))
if pid == 1:
  time.sleep(35)
print("total", float(total(rows)), float(total(rows * 2)), flush=True)
"""


def test_a_program_that_one_process_reaches_35_s_late_runs_on_both(tmp_path):
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen([sys.executable, "-c", LATE_PROCESS, str(i), str(port)], env=env(1), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    assert "total 9.0 18.0" in out, out + err[-2000:]      # 3 x 1 + 3 x 2, then doubled: the same program


class _FakeCoordinationService:
  """The two calls PeerWatch makes on JAX's coordination client, over a dict."""

  def __init__(self):
    self.store, self.lock = {}, threading.Lock()

  def key_value_set(self, key, value, allow_overwrite=False):
    with self.lock:
      self.store[key] = value

  def key_value_dir_get(self, prefix):
    with self.lock:
      return [(k, v) for k, v in self.store.items() if k.startswith(prefix)]


@pytest.mark.parametrize("peer_alive", [True, False])
def test_wait_for_lost_names_a_silent_peer_and_returns_early_while_every_peer_beats(monkeypatch, peer_alive):
  service = _FakeCoordinationService()
  monkeypatch.setattr(distributed, "_client", lambda: service)
  monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
  monkeypatch.setattr(distributed.jax, "process_index", lambda: 0)
  stop = threading.Event()

  def peer():             # process 1's heartbeat, every 0.2 s while alive; a lost peer beats only at first
    for count in range(1, 1000):
      service.key_value_set(f"{distributed._KEY}1", str(count))
      if stop.wait(0.2) or (not peer_alive and count == 3):
        return

  threading.Thread(target=peer, daemon=True).start()
  lost_seen = []
  with distributed.PeerWatch(2.0, lost_seen.append) as watch:
    time.sleep(1.0)                          # the watch has seen process 1's counter
    t0 = time.monotonic()
    lost = watch.wait_for_lost(20.0)
    waited = time.monotonic() - t0
  stop.set()
  if peer_alive:
    assert lost == [] and waited < 6.0, (lost, waited)    # 3 beats seen: no need to wait out the 20 s
    assert lost_seen == []
  else:
    assert lost == [1] and waited < 6.0, (lost, waited)   # named once silent for the 2 s timeout
