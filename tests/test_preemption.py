"""A signal outside the epoch loop still stops the process (preemption.py),
and a training runner ends on it with one line and 128 + the signal."""

import os
import signal
import subprocess
import sys

import pytest

from cat_jax import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_signal_the_loop_never_saw_is_raised_on_leaving():
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(checkpoints.Interrupted) as e:
    with checkpoints.Preemption() as p:
      os.kill(os.getpid(), signal.SIGTERM)  # caught: the test goes on
      assert p.signum == signal.SIGTERM
  assert e.value.signum == signal.SIGTERM and e.value.phase is None
  assert "run the same command" in str(e.value)
  assert signal.getsignal(signal.SIGTERM) is before


def test_no_signal_no_raise_and_an_interruption_passes_unchanged():
  with checkpoints.Preemption() as p:
    pass
  assert p.signum == 0
  inner = checkpoints.Interrupted("pretrain", 3, signal.SIGTERM)
  with pytest.raises(checkpoints.Interrupted) as e:
    with checkpoints.Preemption():
      os.kill(os.getpid(), signal.SIGTERM)
      raise inner
  assert e.value is inner and "epoch 3" in str(e.value)


def test_a_runner_stopped_by_a_signal_exits_with_one_line():
  code = ("from cat_jax import checkpoints\n"
          "from cat_jax.experiments import common\n"
          "def main(argv):\n"
          "  raise checkpoints.Interrupted('cas', 7, 15)\n"
          "common.run_app(main)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 128 + 15, proc.stderr
  assert "interrupted at epoch 7 of phase 'cas'" in proc.stderr
  assert "Traceback" not in proc.stderr
