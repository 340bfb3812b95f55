"""Preemption: SIGTERM and Ctrl-C stop training at the end of the epoch,
after saving `latest`, so that the same command resumes it exactly."""

from __future__ import annotations

import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class Interrupted(Exception):
  """Training stopped on a signal after saving `latest` at `epoch`."""

  def __init__(self, phase: str | None, epoch: int | None, signum: int):
    self.phase, self.epoch, self.signum = phase, epoch, signum
    if phase is None:
      # The signal came outside the epoch loop (while resuming a finished
      # run, compiling, or in the final test); everything is saved.
      super().__init__(f"stopped by signal {signum} after the run's last "
                       "save; run the same command to continue")
    else:
      super().__init__(f"interrupted at epoch {epoch} of phase {phase!r}; "
                       "run the same command to resume")


class Preemption:
  """Turns SIGTERM and SIGINT into a request to stop after the epoch.

  With several processes (`jax.distributed`), SIGTERM is left to JAX's
  preemption service and Orbax's `CheckpointManager.reached_preemption`,
  which makes every process stop at the same epoch; a Ctrl-C on any
  process is shared with a small all-gather. A second Ctrl-C stops at once.
  """

  def __init__(self):
    self.signum = 0
    self._old = {}

  def _handler(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signum:
      raise KeyboardInterrupt  # second Ctrl-C
    self.signum = signum
    logging.warning("signal %d: stopping after this epoch (with a "
                    "checkpoint)", signum)

  def __enter__(self):
    import threading
    if threading.current_thread() is not threading.main_thread():
      return self  # signals can only be caught on the main thread
    sigs = [signal.SIGINT]
    if jax.process_count() == 1:
      sigs.append(signal.SIGTERM)
    for s in sigs:
      self._old[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, exc_type, *exc):
    caught = bool(self._old) and jax.process_count() == 1
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old = {}
    if exc_type is None and caught and self.signum:
      # A signal that the epoch loop never saw (it came after the last
      # epoch) still stops the process: otherwise a runner of many runs
      # (table2, eps_sweep) would drop it and start the next run.
      raise Interrupted(None, None, self.signum)
    return False

  def reached(self, mgr: ocp.CheckpointManager, epoch: int) -> int:
    """The signal to stop on after `epoch` (0: go on); the same on every
    process."""
    if jax.process_count() == 1:
      return self.signum
    from jax.experimental import multihost_utils
    if mgr.reached_preemption(epoch):
      return signal.SIGTERM
    flags = multihost_utils.process_allgather(np.int32(self.signum))
    return int(np.max(flags))
