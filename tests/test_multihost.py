"""Multi-process training: 2 local processes x 2 CPU devices, as on 2 hosts.

Runs `launch.py` with the `jax.distributed` flags in two processes that meet
at a local coordinator, and checks that they give exactly the results of
one process with the same 4 devices, and that only process 0 writes files.
The two processes shard the user tables (`parallel.shard_data`), so each
builds only its own users' rows; the single process replicates them.
"""

import json
import os
import socket
import subprocess
import sys
from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo config (configs/default.py) shrunk to compile and train in
# seconds: what is checked is the processes, not the model.
ARGS = ["--config.train.epochs=2", "--config.train.eval_every=1",
        "--config.adv.epochs=0", "--config.data.synthetic.num_users=301",
        "--config.data.synthetic.num_items=120",
        "--config.data.synthetic.num_clusters=6", "--config.data.max_len=12",
        "--config.model.name=gru4rec", "--config.model.hidden=16",
        "--config.eval.batch_size=160", "--config.train.batch_size=128"]


def launch(workdir, log, devices, *extra):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": xla_flags(devices)}
  # Output goes to a file: a full pipe would block one process, and the
  # other would wait for it inside a collective.
  return subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "launch.py"),
       f"--workdir={workdir}", *ARGS, *extra], cwd=ROOT, env=env,
      stdout=open(log, "w"), stderr=subprocess.STDOUT)


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process_with_as_many_devices(tmp_path):
  port = free_port()
  multi = [launch(tmp_path / "multi", tmp_path / f"p{i}.log", 2,
                  f"--coordinator_address=localhost:{port}",
                  "--num_processes=2", f"--process_id={i}",
                  "--config.parallel.shard_data=True")
           for i in range(2)]
  single = launch(tmp_path / "single", tmp_path / "single.log", 4)
  for name, p in zip(("p0", "p1", "single"), multi + [single]):
    try:
      p.wait(timeout=600)
    finally:
      if p.poll() is None:
        p.kill()
    assert p.returncode == 0, open(tmp_path / f"{name}.log").read()[-3000:]
  a = json.load(open(tmp_path / "multi" / "results.json"))["pretrain"]
  b = json.load(open(tmp_path / "single" / "results.json"))["pretrain"]
  for k in ("selected_epoch", "valid/ndcg@10", "test/ndcg@10", "test/hr@10"):
    assert a[k] == b[k], k
  # Each process built only its half of the user tables.
  for i in range(2):
    assert "built 152 of 304 user rows" in open(tmp_path / f"p{i}.log").read()
  # Process 0 alone wrote the metrics: one line per evaluation, not two.
  lines = open(tmp_path / "multi" / "metrics.jsonl").read().splitlines()
  assert len(lines) == len(
      open(tmp_path / "single" / "metrics.jsonl").read().splitlines())


def test_sigterm_on_one_process_stops_both_at_the_same_epoch(tmp_path):
  """JAX's preemption service (through Orbax's reached_preemption) makes a
  SIGTERM on one host stop every process after the same epoch, with a save."""
  import signal
  import time
  port = free_port()
  long_run = ["--config.train.epochs=60", "--config.train.eval_every=7"]
  procs = [launch(tmp_path / "run", tmp_path / f"p{i}.log", 2,
                  f"--coordinator_address=localhost:{port}",
                  "--num_processes=2", f"--process_id={i}", *long_run)
           for i in range(2)]
  try:
    deadline = time.time() + 300
    while "epoch 4/60" not in open(tmp_path / "p0.log").read():
      assert time.time() < deadline and procs[0].poll() is None, \
          open(tmp_path / "p0.log").read()[-3000:]
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    for p in procs:
      p.wait(timeout=300)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  epochs = []
  for i, p in enumerate(procs):
    log = open(tmp_path / f"p{i}.log").read()
    assert p.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "Traceback" not in log
    line = [l for l in log.splitlines() if "interrupted at epoch" in l][-1]
    epochs.append(int(line.split("epoch ")[1].split()[0]))
  assert epochs[0] == epochs[1] < 60
  assert os.listdir(tmp_path / "run" / "pretrain" / "latest") == [
      str(epochs[0])]
