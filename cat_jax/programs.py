"""The compiled programs of a run, kept for the next runs of the process.

A table (seeds x methods), an eps sweep or a test suite trains many runs in
one process. Each run builds its jitted programs afresh (the initializer,
the epoch of each method structure, the ranker), and a fresh jitted function
traces, lowers and then compiles or loads its executable again: for Video
SASRec `cas` ~10 s of every run (trace 2.9 s, lower 1.0 s, load 6.5 s from
the persistent cache; benchmarks/RESULTS.md, "Compilation"). `for_setup`
hands a run the programs of an earlier run of the same setup instead.

The setup key is the config without the fields that cannot shape a program
(`RUNTIME_FIELDS`: loop lengths, folders, the seed, and the values that are
runtime inputs of the programs, such as eps), plus everything a program
closes over that does not come from the config: the item count, the plans'
shapes, the device tables' shapes, the mesh, the number of runs trained
together and the compiler options. A field missing from `RUNTIME_FIELDS`
only costs sharing; every other field is in the key, so a program is never
reused for a setup it was not built for. What jit itself keys on (argument
shapes, shardings, JAX's config contexts) it checks on every call anyway.

Only the last `MAX_SETUPS` setups are kept (their executables hold memory).
"""

from __future__ import annotations

import collections
import dataclasses
import json

import numpy as np

from cat_jax import compilation, config_lib

# Config fields that no program depends on: they steer the training loop,
# name folders, or reach the programs as runtime inputs (the PRNG keys, the
# method's eps, lambdas and xi; `adv.method` picks the program, see
# `adversarial.AdvConfig.structure`).
RUNTIME_FIELDS = frozenset({
    "seed", "compilation_cache",
    "train.epochs", "train.eval_every", "train.log_every", "train.patience",
    "train.pretrain_dir", "train.heartbeat_s",
    "adv.epochs", "adv.eval_every", "adv.patience", "adv.init", "adv.method",
    "adv.eps", "adv.lambda1", "adv.lambda2", "adv.xi"})

MAX_SETUPS = 4

_SETUPS: collections.OrderedDict = collections.OrderedDict()


def _static(plan) -> tuple | None:
  """A plan's scalars and array shapes (its arrays are runtime inputs)."""
  if plan is None:
    return None
  out = []
  for f in dataclasses.fields(plan):
    v = getattr(plan, f.name)
    if isinstance(v, np.ndarray):
      v = ("array", v.shape)
    elif f.name == "rows":  # EvalPlan: one array per bucket
      v = tuple(len(r) for r in v)
    out.append((f.name, v))
  return tuple(out)


def setup_key(config, num_runs: int, num_items: int, mesh, plan, eval_plan,
              data: dict) -> tuple:
  """What the programs of a run depend on (see the module docstring).

  Args:
    config: the run's config (its `RUNTIME_FIELDS` are left out).
    num_runs: runs trained together (`train.train_runs`).
    num_items: N.
    mesh: the device mesh, or None.
    plan, eval_plan: `batching.TrainPlan`, `batching.EvalPlan` or None.
    data: the device tables ({name: array}).
  """
  fields = {k: v for k, v in config_lib.flat_fields(config).items()
            if k not in RUNTIME_FIELDS}
  options = compilation.compiler_options() or {}
  return (json.dumps(fields, sort_keys=True, default=repr), num_runs,
          num_items, _static(plan), _static(eval_plan),
          tuple(sorted((k, tuple(v.shape), str(v.dtype))
                       for k, v in data.items())),
          mesh, tuple(sorted(options.items())))


def for_setup(key: tuple) -> dict:
  """The programs kept for `key` (empty the first time): a dict the run
  fills ({name or method structure: program}) and later runs read."""
  if key in _SETUPS:
    _SETUPS.move_to_end(key)
  else:
    _SETUPS[key] = {}
    while len(_SETUPS) > MAX_SETUPS:
      _SETUPS.popitem(last=False)
  return _SETUPS[key]


def clear():
  """Forgets every kept program (the next run builds its own)."""
  _SETUPS.clear()
