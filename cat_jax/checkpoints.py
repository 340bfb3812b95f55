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
leaves half a file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from cat_jax.writer import is_chief


# Checkpoints kept per manager: the newest `latest` can be damaged, or half
# written when a kill interrupts its save, and the previous one is the
# fallback; `best` keeps the previous best for a kill between saving a new
# best and recording it in best.json.
KEPT = 2
# Key of a checkpoint's checksum in its Orbax custom metadata.
_CHECKSUM = "cat_jax_sha256"
# Written by Orbax into every step it commits (also where the commit is an
# atomic rename); a checkpoint of ours without it was never committed.
_COMMITTED = "commit_success.txt"
_STEP_METADATA = "_CHECKPOINT_METADATA"
ASIDE = "aside"


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


class _OrbaxErrorsInOneLine(logging.logging.Filter):
  """Orbax logs a failed save from each of its threads, with a traceback;
  `SaveFailed` says what happened, so these keep one line each."""

  def filter(self, record):
    if record.levelno >= logging.logging.ERROR and "orbax" in \
        record.pathname:
      record.msg, record.args = _one_line(record.getMessage()), None
      record.exc_info = record.exc_text = None
    return True


def _orbax_errors_in_one_line():
  log = logging.logging.getLogger("absl")  # the logger Orbax logs through
  if not any(isinstance(f, _OrbaxErrorsInOneLine) for f in log.filters):
    log.addFilter(_OrbaxErrorsInOneLine())


class _Manager(ocp.CheckpointManager):
  """A CheckpointManager whose failed saves (synchronous, or found later
  when an asynchronous one is waited for) raise one-line `SaveFailed`."""

  _saving = None  # the step of the save in flight, if any

  def _failed(self, e, step=None):
    step = self._saving if self._saving is not None else step
    what = f" of epoch {step}" if step is not None else ""
    return _save_failed(f"the checkpoint{what} in {self.directory}", e)

  def save(self, step, *args, **kwargs):
    try:
      saved = super().save(step, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 (a fault on disk, one line)
      # The previous save's failure, if one was in flight, else this one's.
      raise self._failed(e, step) from None
    self._saving = step
    return saved

  def wait_until_finished(self):
    try:
      super().wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._failed(e) from None
    self._saving = None

  def close(self):
    try:
      super().close()
    except Exception as e:  # noqa: BLE001
      raise self._failed(e) from None


def manager(path: str) -> ocp.CheckpointManager:
  """An Orbax manager keeping the last `KEPT` checkpoints under `path`."""
  path = os.path.abspath(path)
  # Multi-process saves meet at barriers named after the step; `latest` and
  # `best` save the same step concurrently, so each manager needs its own
  # barrier prefix (else: "Barrier _async_write_complete.<step> is already
  # ongoing" and a hang).
  prefix = hashlib.sha1(path.encode()).hexdigest()[:12]
  _orbax_errors_in_one_line()
  return _Manager(
      path, options=ocp.CheckpointManagerOptions(
          max_to_keep=KEPT, create=True,
          multiprocessing_options=ocp.options.MultiprocessingOptions(
              barrier_sync_key_prefix=prefix)))


def _host_array(x):
  """`x` on the host; None for an array split across processes."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.sharding.is_fully_replicated:
      return None
    x = x.addressable_data(0)
  return np.ascontiguousarray(np.asarray(x))


def checksum(tree) -> str | None:
  """SHA-256 of a pytree's arrays (paths, dtypes, shapes and bytes); None
  when an array is split across processes (not checked then)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = _host_array(leaf)
    if a is None:
      return None
    h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape};".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def save(mgr: ocp.CheckpointManager, step: int, state, wait: bool = False):
  """Saves `state` at `step` (replacing a checkpoint of the same step), with
  its checksum."""
  if step in mgr.all_steps():
    mgr.delete(step)  # a retrained epoch after a kill: same step again
  digest = checksum(state)
  mgr.save(step, args=ocp.args.StandardSave(state), force=True,
           custom_metadata={_CHECKSUM: digest} if digest else None)
  if wait:
    mgr.wait_until_finished()


def step_dir(mgr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mgr.directory), str(step))


def _recorded_checksum(path: str) -> str | None:
  """The checksum saved with a checkpoint; None for one saved without (by
  an older version). Raises CheckpointDamaged when its metadata is
  unreadable."""
  meta = os.path.join(path, _STEP_METADATA)
  if not os.path.exists(meta):
    return None
  try:
    with open(meta) as f:
      custom = json.load(f).get("custom_metadata") or {}
  except (OSError, ValueError, AttributeError) as e:
    raise CheckpointDamaged(
        path, f"its {_STEP_METADATA} is unreadable ({_one_line(e, 80)})"
    ) from None
  return custom.get(_CHECKSUM)


def _from_orbax_read(exc, text: str = "") -> bool:
  """Whether `exc` was raised reading a checkpoint (in Orbax, TensorStore,
  or asyncio's complaint about the read loop Orbax closed)."""
  tb = getattr(exc, "__traceback__", None)
  while tb is not None:
    if "orbax" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  text = f"{text} {exc}"
  return any(s in text for s in ("Event loop is closed", "orbax",
                                 "tensorstore", "TensorStore"))


class _OrbaxReadNoise(logging.logging.Filter):
  """Drops asyncio's 'Task exception was never retrieved' of Orbax reads."""

  def filter(self, record):
    exc = record.exc_info[1] if record.exc_info else None
    return not ("never retrieved" in str(record.msg) and
                _from_orbax_read(exc, record.getMessage()))


def _unraisable(hook):
  def quiet(u):
    try:
      drop = _from_orbax_read(u.exc_value, repr(u.object))
    except Exception:  # noqa: BLE001 (e.g. while the interpreter exits)
      drop = False
    if not drop:
      hook(u)
  quiet.cat_jax = True
  return quiet


def _quiet_failed_reads():
  """When Orbax fails to read one array of a checkpoint, it drops the reads
  of the others, which then report from other threads, some time later,
  each with a traceback ('Exception ignored in <coroutine ...>', 'Event
  loop is closed', 'Task exception was never retrieved'). A damaged
  checkpoint is reported in one line instead (`restore`), so these are
  dropped (installed once; other errors pass through)."""
  if not getattr(sys.unraisablehook, "cat_jax", False):
    sys.unraisablehook = _unraisable(sys.unraisablehook)
    logging.logging.getLogger("asyncio").addFilter(_OrbaxReadNoise())


def _shapes(tree) -> list:
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape")
                           and hasattr(x, "dtype"))
  return sorted((tuple(x.shape), str(np.dtype(x.dtype))) for x in leaves)


def _other_model(path: str, abstract) -> str | None:
  """How the arrays stored in checkpoint `path` differ from `abstract`, if
  its metadata can be read and shows that they do."""
  try:
    stored = _shapes(ocp.StandardCheckpointHandler().metadata(
        epath.Path(path) / "default"))
  except Exception:  # noqa: BLE001 (unreadable metadata: damage, not config)
    return None
  mine = _shapes(abstract)
  if stored == mine:
    return None
  diff = sorted(set(stored) ^ set(mine))[:2]
  return (f"{len(stored)} stored arrays vs {len(mine)} in the model, e.g. "
          f"shapes {diff} differ")


def restore(mgr: ocp.CheckpointManager, target, step: int | None = None):
  """Restores into the structure of `target`, checked.

  Raises:
    CheckpointDamaged: the checkpoint is missing, was never committed,
      cannot be read, or its arrays differ from its checksum.
    ValueError: its stored arrays have other shapes than `target` (another
      model or data set: the config, not the disk).
  """
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise CheckpointDamaged(str(mgr.directory), "it holds no checkpoint")
  path = step_dir(mgr, step)
  if not os.path.isdir(path):
    raise CheckpointDamaged(path, "it is missing")
  expected = _recorded_checksum(path)
  if expected is not None and not os.path.exists(
      os.path.join(path, _COMMITTED)):
    raise CheckpointDamaged(path, f"Orbax's commit marker {_COMMITTED} is "
                            "missing (a half-written or truncated copy)")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  # Before reading: another model fails on its metadata alone.
  other = _other_model(path, abstract)
  if other:
    raise ValueError(
        f"The checkpoint {path} does not match this model/config ({other}): "
        "a different model, hidden size, max_len or data set? Use a fresh "
        "--workdir or the config that wrote it.")
  _quiet_failed_reads()
  try:
    state = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # noqa: BLE001 (the metadata matched: damage)
    raise CheckpointDamaged(
        path, f"Orbax cannot read it ({_one_line(e, 200)})") from None
  if expected is not None and checksum(state) != expected:
    raise CheckpointDamaged(path, "its arrays differ from what was saved "
                            "(checksum mismatch)")
  return state


def move_aside(mgr: ocp.CheckpointManager, step: int, why: str) -> str:
  """Moves checkpoint `step` of `mgr` to `<phase>/aside/` (process 0), with
  a note saying why; returns its new path. Nothing is deleted."""
  src = step_dir(mgr, step)
  phase_dir = os.path.dirname(str(mgr.directory))
  name = f"{os.path.basename(str(mgr.directory))}-{step}-" + time.strftime(
      "%Y%m%dT%H%M%S", time.gmtime())
  dst = os.path.join(phase_dir, ASIDE, name)
  n = 1
  while os.path.exists(dst):
    n += 1
    dst = os.path.join(phase_dir, ASIDE, f"{name}.{n}")
  if is_chief():
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.exists(src):
      os.rename(src, dst)
    else:
      os.makedirs(dst)
    with open(os.path.join(dst, "why.txt"), "w") as f:
      f.write(f"{src}: {why}\n")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"move_aside {src}")
  mgr.reload()
  return dst


def move_file_aside(path: str, why: str) -> str | None:
  """Moves a phase's file (best.json, results.json) to `<phase>/aside/`."""
  if not os.path.exists(path):
    return None
  d = os.path.join(os.path.dirname(path), ASIDE)
  dst = os.path.join(d, os.path.basename(path) + time.strftime(
      ".%Y%m%dT%H%M%S", time.gmtime()))
  if is_chief():
    os.makedirs(d, exist_ok=True)
    os.replace(path, dst)
    with open(dst + ".why.txt", "w") as f:
      f.write(f"{path}: {why}\n")
  return dst


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
# Falling back from damaged checkpoints (`phase._resume`).
# ----------------------------------------------------------------------------


def _on_every_process(ok: bool) -> bool:
  """`ok` on every process (one collective with several), so that all of
  them fall back alike."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


@dataclasses.dataclass
class Intact:
  """A state read back and checked, and where it came from."""
  epoch: int
  state: object
  source: str  # 'latest/10', 'best/5' or 'the phase start'


class RunCheckpoints:
  """One run's checkpoints of a phase, checked as they are read.

  Damaged ones are moved aside (`move_aside`) and noted in `notes`, for the
  one line that says what was damaged and where training resumes. Process
  0 moves files; every process reads and decides alike.

  Args:
    latest, best: the phase's managers.
    selection: its selection record (`Selection`).
    start: the state the phase starts from (its fallback of last resort).
    phase_dir: the phase's folder.
  """

  def __init__(self, latest, best, selection: Selection, start,
               phase_dir: str):
    self.latest, self.best, self.selection = latest, best, selection
    self.start, self.phase_dir = start, phase_dir
    self.notes = []
    self._best = None  # the selected epoch's state, once read
    self._restart = False  # the selection was lost: train from the start

  def _read(self, mgr, step: int, template):
    """The checked state of `step`, or None (then moved aside, noted)."""
    try:
      state, damage = restore(mgr, template, step), None
    except CheckpointDamaged as e:
      state, damage = None, e
    if not _on_every_process(damage is None):
      damage = damage or CheckpointDamaged(
          step_dir(mgr, step), "another process could not read it")
    if damage is None:
      return state
    name = f"{os.path.basename(str(mgr.directory))}/{step}"
    dst = move_aside(mgr, step, damage.reason)
    self.notes.append(f"{self.phase_dir}/{name} is damaged ({damage.reason}); "
                      f"moved to {dst}")
    return None

  def _selected(self, template):
    """The selected epoch's state from `best`, else from an intact `latest`
    of that epoch (then copied back to `best`); None if neither is left."""
    b = self.selection.epoch
    state = self._read(self.best, b, template) \
        if b in self.best.all_steps() else None
    if state is None and b in self.latest.all_steps():
      state = self._read(self.latest, b, template)
      if state is not None:
        save(self.best, b, state, wait=True)
        self.notes.append(f"best/{b} restored from latest/{b}")
    return state

  def check_selection(self) -> Selection:
    """Checks the selected checkpoint before training resumes.

    Returns the selection to go on with: the same, or, when no intact copy
    of the selected checkpoint is left, a fresh one: the phase then trains
    again from its start, so that its selection is made again from every
    evaluation (best.json and the phase's results.json are moved aside).
    """
    sel, b = self.selection, self.selection.epoch
    if b < 0:
      return sel
    steps = self.best.all_steps()
    if b not in steps and any(s > sel.last_eval for s in steps):
      # Killed between saving a newer best and recording it (workdirs of
      # one kept best): retraining to that epoch selects it again.
      return sel
    self._best = self._selected(self.start)
    if self._best is not None:
      return sel
    moved = [move_file_aside(os.path.join(self.phase_dir, name),
                             f"best/{b} is lost")
             for name in ("best.json", "results.json")]
    self.notes.append(f"no intact copy of the selected epoch {b} is left, "
                      "so the phase trains again from its start (its "
                      f"records moved to {', '.join(filter(None, moved))})")
    self._restart = True
    self.selection = Selection(sel.metric)
    return self.selection

  def selected(self, template):
    """The selected epoch's checked state (for the test).

    Raises:
      CheckpointDamaged: no intact copy of it is left (the same command
        then trains the phase again from its start: `check_selection`).
    """
    b = self.selection.epoch
    state = self._selected(template)
    if state is None:
      raise CheckpointDamaged(
          os.path.join(self.phase_dir, "best", str(b)), "lost",
          f"{'; '.join(self.notes) or f'{self.phase_dir}/best/{b} is lost'}"
          f". No intact copy of the selected epoch {b} is left, so it "
          "cannot be tested; run the same command to train the phase again "
          "from its start.")
    if self.notes:
      logging.warning("%s; the selected epoch %d is tested from it",
                      "; ".join(self.notes), b)
    return state

  def epochs(self) -> set:
    """Epochs this run could resume from (0: its start)."""
    if self._restart:
      return {0}
    out = set(self.latest.all_steps()) | {0}
    if self._best is not None:
      out.add(self.selection.epoch)
    return out

  def rank(self, epoch: int) -> tuple:
    """The order in which resuming points are tried (lowest first): the
    `latest` ones, newest first, then the selected `best`, then the start.
    (From `best`, an evaluation logged after its save may be missing from
    metrics.jsonl; from a `latest` before it, it is logged again.)"""
    if not self._restart and epoch in self.latest.all_steps():
      return (0, -epoch)
    return (2, 0) if epoch == 0 else (1, -epoch)

  def state_at(self, epoch: int) -> Intact | None:
    """The checked state at `epoch` from its first source by `rank`, or
    None when that one is damaged (then moved aside: ask again)."""
    if self.rank(epoch)[0] == 0:
      state = self._read(self.latest, epoch, self.start)
      return None if state is None else Intact(epoch, state,
                                               f"latest/{epoch}")
    if epoch == 0:
      return Intact(0, self.start, "the phase start")
    if self._best is not None and epoch == self.selection.epoch:
      return Intact(epoch, self._best, f"best/{epoch}")
    return None

  def first(self) -> Intact:
    """The first intact state by `rank`."""
    while True:
      found = self.state_at(min(self.epochs(), key=self.rank))
      if found is not None:
        return found

  def settle(self, found: Intact):
    """Makes `latest` say where training resumes: a state taken from `best`
    is saved as the latest too (the workdir checks read the latest epoch)."""
    if found.source.startswith("best/"):
      save(self.latest, found.epoch, found.state, wait=True)
      self.notes.append(f"latest/{found.epoch} restored from {found.source}")

  def set_aside_after(self, epoch: int):
    """Moves the `latest` checkpoints newer than `epoch`, where training
    resumes, aside (they are trained again, and a newer step would be taken
    for the latest); when the phase starts again, its `best` ones too (they
    belong to the lost selection)."""
    kinds = [self.latest] + ([self.best] if self._restart else [])
    for mgr in kinds:
      for step in mgr.all_steps():
        if step > epoch:
          name = f"{os.path.basename(str(mgr.directory))}/{step}"
          dst = move_aside(mgr, step, f"training resumed from epoch {epoch}")
          self.notes.append(f"{name} set aside (training resumes before "
                            f"it) in {dst}")


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
