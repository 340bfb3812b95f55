"""A small JSON-lines metrics writer; only process 0 writes files."""

from __future__ import annotations

import json
import math
import os
import time

import jax
from absl import logging


def is_chief() -> bool:
  """True on the one process that writes files (process 0)."""
  return jax.process_index() == 0


def _clean(v):
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/inf
  return v


class JsonlWriter:
  """Appends one JSON object per line to `path`, flushed on every write."""

  def __init__(self, path: str):
    self._file = None
    if is_chief():
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      self._file = open(path, "a", encoding="utf-8")

  def write(self, record: dict):
    if self._file is None:
      return
    record = {"time": round(time.time(), 3),
              **{k: _clean(v) for k, v in record.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def close(self):
    if self._file is not None:
      self._file.close()
      self._file = None


class _QuietLibraries(logging.logging.Filter):
  """Keeps progress lines readable: Orbax logs every checkpoint step at
  INFO, and JAX says at INFO that it found no TPU on every machine that
  has none."""

  def filter(self, record):
    if record.levelno >= logging.logging.WARNING:
      return True
    return ("orbax" not in record.pathname and
            "Unable to initialize backend" not in str(record.msg))


def quiet_library_logs():
  """Drops the INFO chatter of Orbax from the absl log (call inside app.run)."""
  logging.get_absl_handler().addFilter(_QuietLibraries())

