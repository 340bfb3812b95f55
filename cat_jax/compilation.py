"""XLA compilation: the persistent cache every entry point turns on, and a
counter of what a block of code compiled.

Compiling is most of a short run (on one CPU core a bucketed `cas` epoch
compiles for ~40 s and then runs in ~12 s) and a user waits for it. JAX can
keep compiled programs on disk and reuse them in any later process whose
program is the same (same shapes, same structure; the data, the eps and the
level-1 weights are runtime inputs, see `train.epoch_program`).
`setup_cache` turns that on by default in a per-user folder:

  config.compilation_cache   'auto' (default), 'off', or a folder
  $CAT_COMPILATION_CACHE     the same, for every command ('auto' reads it)
  $JAX_COMPILATION_CACHE_DIR JAX's own setting, honoured under 'auto'

'auto' uses $CAT_COMPILATION_CACHE, else $JAX_COMPILATION_CACHE_DIR, else
`default_dir()` ($XDG_CACHE_HOME/cat_jax/xla, ~/.cache/cat_jax/xla without
it). Nothing is evicted (JAX's size cap needs the `filelock` package): a
paper setting leaves a few MB per program shape; `rm -r` the folder to
clear it.
"""

from __future__ import annotations

import os
import time

import jax
from absl import logging

ENV = "CAT_COMPILATION_CACHE"
# The cache is for programs that take a while to compile; tiny ones (eager
# ops, the popularity counts) are cheaper to compile than to look up.
MIN_COMPILE_S = 0.5


def default_dir() -> str:
  """The per-user cache folder, outside any checkout."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(base, "cat_jax", "xla")


def resolve(setting: str = "auto") -> str | None:
  """The cache folder for a `compilation_cache` setting; None when off."""
  setting = (setting or "auto").strip()
  if setting == "auto":
    setting = (os.environ.get(ENV) or
               os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_dir())
  if setting.lower() in ("off", "none", "0", "false"):
    return None
  return os.path.abspath(os.path.expanduser(setting))


def setup_cache(setting: str = "auto") -> str | None:
  """Turns JAX's persistent compilation cache on (or leaves it off).

  Call it before the first compilation of the process: JAX reads the folder
  when it first compiles. A folder that cannot be created turns the cache
  off with a warning (compiling still works, it is only slower).

  Returns:
    The folder in use, or None.
  """
  path = resolve(setting)
  current = jax.config.jax_compilation_cache_dir
  if path is None:
    if current:
      jax.config.update("jax_compilation_cache_dir", None)
    return None
  if current and os.path.abspath(current) == path:
    return path
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    logging.warning("compilation cache off: cannot create %s (%s)", path, e)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    MIN_COMPILE_S)
  return path


# XLA options of our CPU programs. LLVM's most expensive optimizations (its
# -O2 pipeline) cost ~40% of the compile time of a bucketed train epoch and
# buy nothing measurable in its speed (benchmarks/RESULTS.md, "Compilation");
# -O0 would compile faster still but runs the epoch ~4x slower.
CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1,
                        "xla_llvm_disable_expensive_passes": True}


def compiler_options() -> dict | None:
  """`jax.jit(compiler_options=...)` for the default backend: the CPU
  options above, nothing elsewhere (GPU and TPU keep XLA's defaults).

  An option also set in $XLA_FLAGS (`--xla_backend_optimization_level=0`)
  is left to XLA_FLAGS, which then applies to every program of the process:
  the test suite compiles its tiny programs with XLA's fast-compile flags
  that way (tests/conftest.py; docs/scaling.md).
  """
  if jax.default_backend() != "cpu":
    return None
  named = {f.lstrip("-").split("=")[0]
           for f in os.environ.get("XLA_FLAGS", "").split()}
  return {k: v for k, v in CPU_COMPILER_OPTIONS.items()
          if k not in named} or None


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class CompileCounter:
  """Counts the XLA compilations requested inside a `with` block.

  Attributes (after or during the block):
    requests: programs handed to XLA (jit's in-memory cache missed).
    hits: of those, found in the persistent cache (not compiled).
    seconds: time spent in those requests (compiling or loading).

  `compiled` = requests - hits: the programs XLA really compiled.
  """

  def __init__(self):
    self.requests = self.hits = 0
    self.seconds = 0.0

  @property
  def compiled(self) -> int:
    return self.requests - self.hits

  def _on_duration(self, event, duration, **kwargs):
    del kwargs
    if event == _COMPILE_EVENT:
      self.requests += 1
      self.seconds += duration

  def _on_event(self, event, **kwargs):
    del kwargs
    if event == _HIT_EVENT:
      self.hits += 1

  def __enter__(self):
    self._t0 = time.time()
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    jax.monitoring.register_event_listener(self._on_event)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._on_duration)
    jax.monitoring.unregister_event_listener(self._on_event)
    return False
