"""The workdir contract: what a run writes, when, and when it may resume.

Layout of a workdir:

  config.json      the resolved config of the last run that went ahead.
  metrics.jsonl    one line per evaluation (and per test) of every run.
  results.json     per phase: selected epoch, validation and test metrics.
  item_ids.txt     original item id of each internal id (`write_item_ids`;
                   read by recommend.py).
  <phase>/         `pretrain` (phase 1) or the phase-2 method's name:
    signature.json everything that shaped the phase (`phase_signature`);
                   phase 2 also records the phase-1 epoch it started from.
    latest/        Orbax checkpoint of the last evaluated (or interrupted)
                   epoch; a run restarts from it.
    best/          Orbax checkpoint of the epoch with the best validation
                   metric (`eval.select`); the only one that is tested.
    best.json      the selection record (`Selection`): best epoch and value,
                   evaluations since the best (early stopping), last
                   evaluated epoch.
    results.json   the phase's test metrics, written once it is finished.

The contract (`check_workdir`, called before anything is written):
  * A phase resumes only under the signature it was trained with. A
    mismatch stops the run before it writes anything, naming every
    differing field (old -> new) and the two ways out: another workdir, or
    `retrain=True` (`launch.py --retrain`), which deletes the affected phases.
  * Extending the last phase's epochs is allowed (`train.epochs` when there
    is no phase 2, `adv.epochs` for phase 2); a phase cannot shrink below
    the epochs it has trained.
  * Phase 2 belongs to the phase-1 state it started from: when phase 1 would
    train further (more epochs, a larger patience) while a phase 2 exists,
    or phase 1 no longer ends where that phase 2 started, the run is refused
    (or, with retrain, phase 2 is deleted and trained again).
  * Interrupted runs (SIGTERM, Ctrl-C; `Preemption`) save `latest` at the
    end of the current epoch, so the same command resumes them exactly.
Only process 0 writes the JSON files; Orbax coordinates the checkpoint
writes of all processes. JSON files are replaced atomically, so a kill never
leaves half a file.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import shutil
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

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
  # Per-process name: two runners sharing a seed folder (one per core) both
  # rewrite its results.json.
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(content, f, indent=indent)
  os.replace(tmp, path)


def read_json(path: str, default=None):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


ITEM_IDS = "item_ids.txt"


def plain_id(x):
  """A JSON-able id: Python int for integer ids, else str."""
  if isinstance(x, (bool, np.bool_)):
    return str(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  return str(x)


def write_item_ids(workdir: str, dataset) -> str:
  """Writes `<workdir>/item_ids.txt`: line i = original id of internal item i.

  Each line is a JSON value (`123` or `"B00X"`), so the ids read back with
  their type (`recommend.read_item_ids`). Written atomically (a temporary
  file, then renamed), by process 0 only. `dataset` is a `data.Dataset` or
  its `item_ids` list. Returns the path.
  """
  ids = dataset.item_ids if hasattr(dataset, "item_ids") else dataset
  n = getattr(dataset, "num_items", len(ids))
  if len(ids) != n:
    raise ValueError(f"the data set has {n} items but {len(ids)} item ids")
  path = os.path.join(workdir, ITEM_IDS)
  if not is_chief():
    return path
  os.makedirs(workdir, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for x in ids:
      f.write(json.dumps(plain_id(x)) + "\n")
  os.replace(tmp, path)
  return path


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


# ----------------------------------------------------------------------------
# Signatures and the checks before a run.
# ----------------------------------------------------------------------------

PRETRAIN = "pretrain"
# Fields that may change between a run and its resumption: how long a phase
# trains (extending the last phase is allowed), logging, evaluation
# cadence, devices, and where phase 1 lives.
_FREE_TRAIN = ("epochs", "eval_every", "log_every", "pretrain_dir",
               "patience")
_FREE_ADV = ("epochs", "eval_every", "patience")


def _plain(config) -> dict:
  """The config as JSON-able dicts (tuples become lists)."""
  return json.loads(json.dumps(config.to_dict(), default=str))


def phase_signature(config, phase: str) -> dict:
  """Everything that shaped `phase` (phase 1, or the phase-2 method).

  Phase 1: the seed, data, model, training settings and the selection
  metric. Phase 2: its `adv` settings and phase 1's signature (the phase it
  started from; the epoch it started at is checked separately).
  """
  d = _plain(config)
  # Knobs added later are left out at their 'off' value, so that workdirs
  # written before them keep their signatures.
  if d["data"].get("poison", {}).get("attack", "none") == "none":
    d["data"].pop("poison", None)
  if d["adv"].get("magnitude", "uniform") == "uniform":
    d["adv"].pop("magnitude", None)
  pre = {"seed": d["seed"], "data": d["data"], "model": d["model"],
         "train": {k: v for k, v in d["train"].items()
                   if k not in _FREE_TRAIN},
         "select": d["eval"]["select"]}
  if phase == PRETRAIN:
    return pre
  return _comparable(
      {"adv": {k: v for k, v in d["adv"].items() if k not in _FREE_ADV},
       "from": pre})


# What `none` (phase 1's loss, trained on) reads of the adv section; its
# perturbation knobs change nothing, so they must not refuse a workdir.
_NONE_ADV = ("method", "init")


def _comparable(sig: dict) -> dict:
  """A phase-2 signature without the fields its method ignores (also for
  signatures written before this rule)."""
  adv = sig.get("adv", {})
  if adv.get("method") != "none":
    return sig
  return {**sig, "adv": {k: v for k, v in adv.items() if k in _NONE_ADV}}


def _diff(old, new, prefix="") -> list:
  """['field: old -> new', ...] between two signature dicts."""
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
    name = prefix + key
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, name + ".")
    elif a != b:
      out.append(f"{name}: {a!r} -> {b!r}")
  return out


def _readable(diff: list) -> str:
  # Phase 2's copy of phase 1's fields is named like the config fields.
  return "; ".join(x.replace("from.", "").replace("select:", "eval.select:")
                   for x in diff)


def latest_step(phase_dir: str) -> int | None:
  """Epoch of a phase's latest checkpoint, read without touching the disk."""
  path = os.path.join(phase_dir, "latest")
  if not os.path.isdir(path):
    return None
  steps = [int(n) for n in os.listdir(path) if n.isdigit()]
  return max(steps) if steps else None


class WorkdirMismatch(ValueError):
  """The workdir holds phases trained under other settings."""


@dataclasses.dataclass
class PhaseCheck:
  """What `check_workdir` found for one run, for the caller to act on."""
  delete: list        # phase dirs to delete before training (retrain)
  pretrain_done: bool  # phase 1 will not train further


def _way_out(what: str) -> str:
  return (f"{what} Use another --workdir, or pass --retrain (launch.py) / "
          "retrain=True to delete and retrain the affected phases.")


def check_workdir(config, workdir: str, pre_dir: str, reuse: bool,
                  retrain: bool = False) -> PhaseCheck:
  """Checks a run's config against what its workdir holds; writes nothing.

  Args:
    config: the run's resolved config.
    workdir: where phase 2 (and, unless `reuse`, phase 1) lives.
    pre_dir: the workdir holding phase 1 (`workdir` unless reused).
    reuse: phase 1 must already exist in `pre_dir` (train.pretrain_dir).
    retrain: instead of refusing, list the mismatching phases to delete.

  Raises:
    WorkdirMismatch (one line: the differing fields and the ways out), or
    FileNotFoundError when a reused phase 1 does not exist.
  """
  delete = []
  pdir = os.path.join(pre_dir, PRETRAIN)
  sig = read_json(os.path.join(pdir, "signature.json"))
  latest = latest_step(pdir)
  if reuse and sig is None:
    raise FileNotFoundError(
        f"train.pretrain_dir={pre_dir!r} holds no pretrain/ phase; run phase "
        "1 there first.")
  if sig is not None and sig != phase_signature(config, PRETRAIN):
    diff = _readable(_diff(sig, phase_signature(config, PRETRAIN)))
    if reuse or not retrain:
      raise WorkdirMismatch(_way_out(
          f"{pdir} was trained with other settings ({diff})." if not reuse
          else f"train.pretrain_dir {pdir} was trained with other settings "
          f"({diff}); use another train.pretrain_dir."))
    delete.append(pdir)
    latest = None
  if latest is not None and latest > config.train.epochs and \
      config.train.epochs > 0:
    raise WorkdirMismatch(
        f"{pdir} has trained {latest} epochs, more than train.epochs="
        f"{config.train.epochs}; raise train.epochs or use another --workdir.")
  stopped = Selection.load(selection_path(pdir), config.eval.select).stopped(
      config.train.patience)
  done = latest is not None and (latest >= config.train.epochs or stopped)
  if reuse:
    done = True  # a reused phase 1 is taken as it is
  method = config.adv.method
  for name in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []:
    sdir = os.path.join(workdir, name)
    ssig = read_json(os.path.join(sdir, "signature.json"))
    if name == PRETRAIN or not isinstance(ssig, dict) or "from" not in ssig:
      continue
    problem = None
    began = ssig.get("start_epoch")
    # Each phase 2 is checked against the start its own adv.init implies.
    init = ssig.get("adv", {}).get("init", "last")
    start = phase1_end(pdir, init) if done else None
    if pdir in delete:
      problem = "was trained from a phase 1 that is now retrained"
    elif not done:
      problem = (f"was trained from phase-1 epoch {began}, but phase 1 "
                 f"would now train on from epoch {latest or 0} to "
                 f"train.epochs={config.train.epochs}")
    elif began != start:
      problem = (f"was trained from phase-1 epoch {began}, but phase 1 now "
                 f"ends at epoch {start} (adv.init={init!r})")
    elif name == method and config.adv.epochs > 0:
      mine = phase_signature(config, method)
      old = _comparable({k: v for k, v in ssig.items()
                         if k != "start_epoch"})
      if old != mine:
        problem = (f"was trained with other settings "
                   f"({_readable(_diff(old, mine))})")
    if problem is None:
      lat = latest_step(sdir)
      if name == method and config.adv.epochs > 0 and lat is not None and \
          lat > config.adv.epochs:
        raise WorkdirMismatch(
            f"{sdir} has trained {lat} epochs, more than adv.epochs="
            f"{config.adv.epochs}; raise adv.epochs or use another --workdir.")
      continue
    if not retrain:
      raise WorkdirMismatch(_way_out(
          f"Phase {name!r} in {workdir} {problem}."))
    delete.append(sdir)
  return PhaseCheck(delete=delete, pretrain_done=done)


def phase1_end(pdir: str, init: str) -> int | None:
  """The phase-1 epoch that a phase 2 with adv.init=`init` starts from."""
  if init == "best":
    d = read_json(selection_path(pdir))
    return None if d is None else d["epoch"]
  return latest_step(pdir)


def apply_deletions(check: PhaseCheck, workdirs) -> None:
  """Deletes the phases `check_workdir` found stale (retrain), and their
  entries in the workdirs' results.json (process 0 only)."""
  if not is_chief():
    return
  for d in check.delete:
    logging.warning("retrain: deleting %s", d)
    shutil.rmtree(d, ignore_errors=True)
    name = os.path.basename(d)
    for w in workdirs:
      path = os.path.join(w, "results.json")
      content = read_json(path)
      if content and name in content:
        content.pop(name)
        write_json(path, content)


def write_signature(config, phase_dir: str, phase: str,
                    start_epoch: int | None = None):
  """Records what shaped a phase when it starts (process 0 only)."""
  sig = phase_signature(config, phase)
  if phase != PRETRAIN:
    sig["start_epoch"] = start_epoch
  write_json(os.path.join(phase_dir, "signature.json"), sig)


def suggest(name: str, options) -> str:
  """' (did you mean X?)' for the closest option, or ''."""
  close = difflib.get_close_matches(name, list(options), n=1)
  return f" (did you mean {close[0]}?)" if close else ""


# ----------------------------------------------------------------------------
# Preemption: SIGTERM / Ctrl-C stop at the end of the epoch, with a save.
# ----------------------------------------------------------------------------


class Interrupted(Exception):
  """Training stopped on a signal after saving `latest` at `epoch`."""

  def __init__(self, phase: str, epoch: int, signum: int):
    self.phase, self.epoch, self.signum = phase, epoch, signum
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

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old = {}
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
