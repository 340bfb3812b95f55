"""The workdir contract: what a run writes, when, and when it may resume.

Layout of a workdir:

  lock             the one-writer lock (`workdir_lock`): held by the run
                   that writes the workdir; records the last holder.
  config.json      the resolved config of the last run that went ahead.
  metrics.jsonl    one line per evaluation (and per test) of every run.
  results.json     per phase: selected epoch, validation and test metrics.
  item_ids.txt     original item id of each internal id (`write_item_ids`;
                   read by recommend.py).
  <phase>/         `pretrain` (phase 1) or the phase-2 method's name:
    signature.json everything that shaped the phase (`phase_signature`);
                   phase 2 also records the phase-1 epoch it started from.
    latest/        Orbax checkpoints of the last two evaluated (or
                   interrupted) epochs; a run restarts from the newer one.
    best/          Orbax checkpoints of the epochs with the best validation
                   metric (`eval.select`), the last two; the selected one
                   is the only one that is tested.
    best.json      the selection record (`Selection`): best epoch and value,
                   evaluations since the best (early stopping), last
                   evaluated epoch.
    results.json   the phase's test metrics, written once it is finished.
    aside/         checkpoints found damaged (or left behind by a fallback),
                   moved here, never deleted; each with a note saying why.

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
Faults (docs/workdir.md lists each guarantee with the test that proves it):
  * One writer: a run locks its workdirs (`workdir_lock`); a second run
    into a busy workdir stops at once with one line naming the holder.
  * Every checkpoint carries a checksum of its arrays (`checksum`, in its
    Orbax metadata, committed with it). `restore` checks Orbax's commit
    marker, that Orbax can read it, and the checksum; a checkpoint that
    fails is damaged (`CheckpointDamaged`), never blamed on the config
    unless its stored shapes differ from the model's. Training then moves
    it aside and falls back: the older `latest`, the selected `best`, the
    phase start (`phase._resume`), saying so in one line.
  * A kill (SIGKILL included) at any moment loses at most one evaluation
    interval: saves are atomic (Orbax commits a step by renaming it into
    place) and the checkpoints before an interrupted save stay intact.
  * A save that fails (a full disk) stops the run with one line
    (`SaveFailed`); the checkpoints saved before it stay usable.
Only process 0 writes the JSON files; Orbax coordinates the checkpoint
writes of all processes. JSON files are replaced atomically, so a kill never
The files of the contract live here: the JSON records, the selection, the
signatures and the checks; the Orbax checkpoints and their integrity are in
`checkpoints`, the one-writer lock in `workdir_lock`, signals in `preemption`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import json
import math
import os
import shutil

import numpy as np
from absl import logging

from cat_jax.writer import is_chief


class CheckpointDamaged(ValueError):
  """A checkpoint failed its checks: Orbax's, or its checksum."""

  def __init__(self, path: str, reason: str, message: str | None = None):
    self.path, self.reason = path, reason
    super().__init__(message or f"{path} is damaged: {reason}.")


class SaveFailed(ValueError):
  """A checkpoint or record could not be written (a full disk, ...)."""


def _one_line(e, limit: int = 300) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= limit else text[:limit] + " ..."


# What a full disk (or quota, or file size limit) says, by errno or in the
# text of TensorStore's error.
_DISK_FULL = {errno.ENOSPC: "No space left on device",
              errno.EDQUOT: "Disk quota exceeded",
              errno.EFBIG: "File too large"}


def _save_failed(what: str, e: BaseException) -> SaveFailed:
  said = str(e)
  if isinstance(e, OSError) and e.errno in _DISK_FULL:
    said = _DISK_FULL[e.errno]
  full = [s for s in _DISK_FULL.values() if s in said]
  why = (f"{full[0]}: the disk is full, or a quota or file size limit was "
         "reached" if full else f"writing failed ({_one_line(e, 200)})")
  return SaveFailed(
      f"Could not save {what}: {why}. What was saved before it is intact: "
      "make room and run the same command to resume from it.")


def write_json(path: str, content, indent: int | None = 1):
  """Writes JSON atomically (process 0 only)."""
  if not is_chief():
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # Per-process name: two runners sharing a seed folder (one per core) both
  # rewrite its results.json.
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(content, f, indent=indent)
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise _save_failed(path, e) from None


def read_json(path: str, default=None):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    try:
      return json.load(f)
    except ValueError as e:  # written atomically: damaged on disk
      raise CheckpointDamaged(path, f"it is not valid JSON ({e})") from None


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
    train_s: seconds spent training and validating up to the last
      evaluation, summed over every process that resumed this phase (the
      work after an evaluation that a kill threw away is not counted).
  """
  metric: str
  epoch: int = -1
  value: float = -math.inf
  evals_since_best: int = 0
  last_eval: int = 0
  train_s: float = 0.0

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
            "last_eval": self.last_eval, "train_s": self.train_s}

  @classmethod
  def load(cls, path: str, metric: str) -> "Selection":
    d = read_json(path)
    if d is None:
      return cls(metric)
    return cls(metric, epoch=d["epoch"], value=d[metric],
               evals_since_best=d.get("evals_since_best", 0),
               last_eval=d.get("last_eval", d["epoch"]),
               train_s=d.get("train_s", 0.0))


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
_FREE_TRAIN = ("epochs", "eval_every", "log_every", "heartbeat_s",
               "pretrain_dir", "patience")
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
  if d["train"].get("layout", "buckets") == "buckets":
    d["train"].pop("layout", None)
    d["train"].pop("pack_rows", None)  # read by the packed layout only
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
