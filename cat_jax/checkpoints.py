"""Checkpoints and the per-phase selection record.

Each phase of a run lives in `<workdir>/<phase>/`:

  latest/          Orbax checkpoint of the last evaluated (or interrupted)
                   epoch; a run restarts from it.
  best/            Orbax checkpoint of the epoch with the best validation
                   metric (`eval.select`); the only one that is tested.
  best.json        the selection record (`Selection`): best epoch and value,
                   evaluations since the best (early stopping), last
                   evaluated epoch.
  results.json     the phase's test metrics, written once it is finished.

Only process 0 writes the JSON files; Orbax coordinates the checkpoint
writes of all processes. JSON files are replaced atomically, so a kill never
leaves half a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os

import jax
import orbax.checkpoint as ocp

from cat_jax.writer import is_chief


def manager(path: str) -> ocp.CheckpointManager:
  """An Orbax manager keeping one checkpoint under `path`."""
  path = os.path.abspath(path)
  # Multi-process saves meet at barriers named after the step; `latest` and
  # `best` save the same step concurrently, so each manager needs its own
  # barrier prefix (else: "Barrier _async_write_complete.<step> is already
  # ongoing" and a hang).
  prefix = hashlib.sha1(path.encode()).hexdigest()[:12]
  return ocp.CheckpointManager(
      path, options=ocp.CheckpointManagerOptions(
          max_to_keep=1, create=True,
          multiprocessing_options=ocp.options.MultiprocessingOptions(
              barrier_sync_key_prefix=prefix)))


def save(mgr: ocp.CheckpointManager, step: int, state, wait: bool = False):
  """Saves `state` at `step` (replacing a checkpoint of the same step)."""
  if step in mgr.all_steps():
    mgr.delete(step)  # a retrained epoch after a kill: same step again
  mgr.save(step, args=ocp.args.StandardSave(state), force=True)
  if wait:
    mgr.wait_until_finished()


def restore(mgr: ocp.CheckpointManager, target, step: int | None = None):
  """Restores into the structure of `target`; a clear error on a mismatch."""
  step = mgr.latest_step() if step is None else step
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    return mgr.restore(step, args=ocp.args.StandardRestore(abstract))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
        f"The checkpoint in {mgr.directory} (step {step}) does not match "
        "this model/config (different model, hidden size, max_len or data "
        "set?). Use a fresh --workdir or the config that wrote it. "
        f"Orbax said: {str(e)[:500]}") from None


def write_json(path: str, content, indent: int | None = 1):
  """Writes JSON atomically (process 0 only)."""
  if not is_chief():
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(content, f, indent=indent)
  os.replace(tmp, path)


def read_json(path: str, default=None):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


@dataclasses.dataclass
class Selection:
  """Model selection and early-stopping state of one phase (best.json).

  Attributes:
    metric: the validation metric that selects (`eval.select`).
    epoch: best epoch so far (-1: none evaluated).
    value: its validation metric.
    evals_since_best: evaluations after `epoch` without an improvement.
    last_eval: the last evaluated epoch (0: none). An evaluation of an
      epoch <= last_eval (retrained after a kill) is not counted twice.
  """
  metric: str
  epoch: int = -1
  value: float = -math.inf
  evals_since_best: int = 0
  last_eval: int = 0

  def update(self, epoch: int, value: float) -> bool:
    """Records an evaluation; True if it is the new best."""
    improved = value > self.value
    if improved:
      self.epoch, self.value, self.evals_since_best = epoch, value, 0
    elif epoch > self.last_eval:
      self.evals_since_best += 1
    self.last_eval = max(self.last_eval, epoch)
    return improved

  def stopped(self, patience: int) -> bool:
    """Early stopping: `patience` evaluations without improvement (0 = off)."""
    return patience > 0 and self.evals_since_best >= patience

  def to_json(self) -> dict:
    return {"epoch": self.epoch, self.metric: self.value,
            "evals_since_best": self.evals_since_best,
            "last_eval": self.last_eval}

  @classmethod
  def load(cls, path: str, metric: str) -> "Selection":
    d = read_json(path)
    if d is None:
      return cls(metric)
    return cls(metric, epoch=d["epoch"], value=d[metric],
               evals_since_best=d.get("evals_since_best", 0),
               last_eval=d.get("last_eval", d["epoch"]))


def selection_path(phase_dir: str) -> str:
  return os.path.join(phase_dir, "best.json")


def best_epoch(workdir: str, phase: str) -> int:
  """The selected epoch of a trained phase; a clear error if there is none."""
  path = selection_path(os.path.join(workdir, phase))
  d = read_json(path)
  if d is None or d.get("epoch", -1) < 0:
    raise FileNotFoundError(
        f"{path} not found: train phase {phase!r} in {workdir} first.")
  return d["epoch"]
