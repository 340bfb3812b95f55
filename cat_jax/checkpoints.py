"""Orbax checkpoints of a workdir's phases: saving, restoring, proving
they are whole, and falling back from damaged ones.

Every checkpoint carries a checksum of its arrays (`checksum`, in its Orbax
metadata, committed with it). `restore` checks Orbax's commit marker, that
Orbax can read it, and the checksum; a checkpoint that fails is damaged
(`CheckpointDamaged`), never blamed on the config unless its stored shapes
differ from the model's. `RunCheckpoints` moves it aside and falls back: the
older `latest`, the selected `best`, the phase start (`phase._resume`),
saying so in one line. The rest of the workdir contract (layout, JSON
records, signatures, the checks before a run) is `cat_jax.workdir`, whose
names are also importable from here, as are `preemption`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from cat_jax.preemption import Interrupted, Preemption  # noqa: F401
from cat_jax.workdir import (  # noqa: F401 (the contract's API, also here)
    ITEM_IDS, PRETRAIN, CheckpointDamaged, PhaseCheck, SaveFailed, Selection,
    WorkdirMismatch, _one_line, _save_failed, apply_deletions, best_epoch,
    check_workdir, latest_step, phase1_end, phase_signature, plain_id,
    read_json, selection_path, suggest, write_item_ids, write_json,
    write_signature)
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
