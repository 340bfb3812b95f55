"""One writer per workdir: an exclusive OS lock held for the whole run.

Two runs writing one workdir (a requeued job while the old one still runs,
a double submit) would both train, overwrite each other's checkpoints and
log every evaluation twice. `train.train_runs` therefore holds the lock of
every workdir it writes (`Held`):

  * `check_free` looks, before the run reads its data and without writing
    anything, whether another run holds a workdir, so that a second launch
    fails at once with one line naming the holder (host, pid, when it took
    the workdir, its command).
  * `Held.acquire` takes the locks once the config, workdirs and data have
    been checked, just before the run writes its first file, so that a run
    that fails on bad input leaves a new workdir uncreated.

The lock is `fcntl.flock` on `<workdir>/lock`. The kernel releases it when
the holder exits, however it exits (SIGKILL included), so a killed job
leaves no stale lock: the file stays, recording the last holder, but only
the kernel's lock counts. On NFS, Linux emulates flock with POSIX locks
that the server arbitrates across hosts (Lustre needs its `flock` mount
option). With several processes (`jax.distributed`), process 0 holds the
lock and every process learns the outcome. Read-only commands (`recommend`,
the reports) take no lock. A phase 2 reading another workdir's phase 1
(`train.pretrain_dir`) locks its own workdir only, so that several runners
can share one seed folder's phase 1.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time

import jax
import numpy as np

from cat_jax.writer import is_chief

LOCK_FILE = "lock"
# `check_free` holds a shared lock for a moment while it looks; a launch
# that tries in that moment retries for this long before it calls the
# workdir busy.
_RETRY_S, _RETRY_EVERY_S = 0.5, 0.05


class WorkdirBusy(ValueError):
  """Another run holds the workdir (one line: the holder, what to do)."""


def _holder(path: str) -> str:
  """'pid 123 on host h since 2025-01-02 10:00:00 UTC: python launch.py ...'"""
  try:
    with open(path) as f:
      h = json.load(f)
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(h["since"]))
    job = f", job {h['job']}" if h.get("job") else ""
    return (f"pid {h['pid']} on host {h['host']}{job}, running since "
            f"{since}: {h['command']}")
  except (OSError, ValueError, KeyError, TypeError):
    return "a run that has not recorded itself yet"


def _busy(workdir: str) -> WorkdirBusy:
  holder = _holder(os.path.join(workdir, LOCK_FILE))
  return WorkdirBusy(
      f"workdir {workdir} is in use by another run ({holder}). "
      "Two runs in one workdir would overwrite each other's checkpoints; "
      "wait until that run ends (or stop it: the same command then resumes "
      "from its checkpoints) and run this again, or use another --workdir.")


def _record() -> bytes:
  """Who holds the lock, for the message of a second launch."""
  job = os.environ.get("SLURM_JOB_ID") or os.environ.get("JOB_ID") or ""
  command = " ".join(sys.argv)
  return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                     "since": time.time(), "job": job,
                     "command": command[:300]}).encode()


def _agree(error: WorkdirBusy | None):
  """Raises `error` on process 0, and a busy error on every other process
  when process 0 has one (one collective with several processes)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.int32(error is not None))
    if error is None and np.any(flags):
      error = WorkdirBusy("process 0 could not take the workdir lock: see "
                          "its error line.")
  if error is not None:
    raise error


def check_free(workdirs) -> None:
  """Raises WorkdirBusy if another run holds one of `workdirs`; writes
  nothing (a shared lock, taken and dropped at once, on an existing lock
  file)."""
  error = None
  if is_chief():
    for w in workdirs:
      try:
        fd = os.open(os.path.join(w, LOCK_FILE), os.O_RDONLY)
      except FileNotFoundError:
        continue  # never locked: free
      try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
      except BlockingIOError:
        error = _busy(w)
        break
      finally:
        os.close(fd)  # also drops the shared lock
  _agree(error)


class Held:
  """The locks of a run's workdirs, from `acquire` until `release` (or the
  end of a `with` block, or the process)."""

  def __init__(self):
    self._fds = []

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()
    return False

  def acquire(self, workdirs) -> None:
    """Locks every workdir (process 0; creating new ones) or none of them.

    Raises:
      WorkdirBusy: another run holds one; the workdirs this call created
        are removed again.
    """
    error = None
    if is_chief():
      made = []  # (folders this call created, path of their lock file)
      try:
        for w in workdirs:
          created = _make_dirs(w)
          self._fds.append(self._lock(w))
          made.append((created, os.path.join(w, LOCK_FILE)))
      except WorkdirBusy as e:
        error = e
        # Only what this call created and holds goes: the lock file is
        # removed while still held, so no other run can hold it meanwhile.
        for created, path in made:
          if created:
            _remove_quietly(path)
        self.release()
        for created, _ in reversed(made):
          for d in reversed(created):
            _remove_quietly(d, folder=True)
    _agree(error)

  @staticmethod
  def _lock(workdir: str) -> int:
    path = os.path.join(workdir, LOCK_FILE)
    deadline = time.time() + _RETRY_S
    while True:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        if time.time() > deadline:
          raise _busy(workdir) from None
        time.sleep(_RETRY_EVERY_S)
        continue
      # A lock file removed (by a run that gave the workdir up) between
      # open and flock is no lock: take the one now at `path`.
      try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, _record(), 0)
    return fd

  def release(self) -> None:
    for fd in self._fds:
      os.close(fd)  # the kernel drops the lock with the last descriptor
    self._fds = []


def _make_dirs(path: str) -> list:
  """Creates `path` and its missing parents; returns those it created."""
  made, p = [], os.path.abspath(path)
  while not os.path.isdir(p):
    made.append(p)
    p = os.path.dirname(p)
  os.makedirs(path, exist_ok=True)
  return made[::-1]


def _remove_quietly(path: str, folder: bool = False):
  try:
    (os.rmdir if folder else os.remove)(path)
  except OSError as e:
    if e.errno not in (errno.ENOENT, errno.ENOTEMPTY):
      raise
