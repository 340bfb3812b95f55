"""One training phase: the epoch loop, validation, selection, early stopping,
resumption after a kill or a signal, and the single test of the selected
checkpoint (`run_phase`).

Several runs (seeds) can go through one phase together, stacked along a
leading axis of the state (`train.train_runs`); each keeps its own workdir,
checkpoints, selection record, metrics and results, exactly as if it had
been trained alone.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cat_jax import checkpoints, evaluate, report


class NonFiniteLoss(FloatingPointError):
  pass


def _check_finite(terms: dict, step0: int, phase: str, where: str = ""):
  loss = np.asarray(terms["loss"])
  bad = np.flatnonzero(~np.isfinite(loss))
  if len(bad):
    i = int(bad[0])
    named = ", ".join(f"{k}={float(np.asarray(v)[i]):.4g}"
                      for k, v in sorted(terms.items()))
    restored = _RESTORED.get((phase, where))
    if restored is not None and restored[0] == step0:
      aside = os.path.join(os.path.dirname(os.path.dirname(restored[1])),
                           checkpoints.ASIDE)
      advice = (
          f"This is the first epoch after restoring {restored[1]}, so that "
          "checkpoint is the likely cause (damaged in a way its checks "
          "missed, or saved without a checksum by an older version): move "
          f"it into {aside}/ and run the same command to resume from the "
          "one before it; only if the loss is still not finite, lower "
          "train.lr or adv.eps.")
    else:
      advice = ("The last good checkpoint is kept; lower train.lr or adv.eps "
                "and restart.")
    raise NonFiniteLoss(
        f"Non-finite loss in phase {phase!r}{where} at step {step0 + i + 1} "
        f"({named}). {advice}")


def take_run(tree, r: int):
  """Run r of a pytree stacked over a leading run axis."""
  return jax.tree.map(lambda x: x[r], tree)


def stack_runs(trees):
  """Stacks per-run pytrees over a new leading run axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


class _Runs:
  """Per-run bookkeeping of one phase: one workdir per run.

  A single run (`stacked=False`) is the special case R = 1 whose state has no
  run axis; stacked runs keep their own checkpoints, selection, metrics and
  results under their own workdirs, exactly as if each had been trained alone.
  """

  def __init__(self, phase, workdirs, writers, keys, stacked, select):
    self.phase, self.stacked, self.select = phase, stacked, select
    self.pdirs = [os.path.join(w, phase) for w in workdirs]
    self.writers, self.keys = writers, keys
    self.latest = [checkpoints.manager(os.path.join(p, "latest"))
                   for p in self.pdirs]
    self.best = [checkpoints.manager(os.path.join(p, "best"))
                 for p in self.pdirs]
    self.selection = [checkpoints.Selection.load(
        checkpoints.selection_path(p), select) for p in self.pdirs]
    # Wall time already counted into every active run's `Selection.train_s`.
    self.counted_until = time.time()

  def __len__(self):
    return len(self.pdirs)

  def take(self, tree, r):
    return take_run(tree, r) if self.stacked else tree

  def join(self, trees):
    return stack_runs(trees) if self.stacked else trees[0]

  def split(self, tree) -> list:
    return [self.take(tree, r) for r in range(len(self))]

  def epoch_key(self, epoch):
    keys = [jax.random.fold_in(k, epoch) for k in self.keys]
    return jnp.stack(keys) if self.stacked else keys[0]

  def where(self, r):
    return f" ({self.pdirs[r]})" if self.stacked else ""

  def active(self, patience: int) -> list:
    """Runs that have not stopped early."""
    return [r for r in range(len(self))
            if not self.selection[r].stopped(patience)]

  def wait(self):
    for m in self.latest + self.best:
      m.wait_until_finished()

  def close(self):
    for m in self.latest + self.best:
      m.wait_until_finished()
      m.close()


def phase_eval_every(config, phase: str) -> int:
  """Validation interval (epochs) of `phase`: adv.eval_every in phase 2."""
  if phase != "pretrain" and config.adv.eval_every:
    return config.adv.eval_every
  return config.train.eval_every


def phase_patience(config, phase: str) -> int:
  """Early-stopping patience (evaluations) of `phase`; 0 = off."""
  return config.train.patience if phase == "pretrain" else \
      config.adv.patience


def _duration(seconds: float) -> str:
  """'42 s', '7.5 min' or '2.1 h'."""
  if seconds < 120:
    return f"{seconds:.0f} s"
  if seconds < 7200:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


def _losses_line(avg: dict, runs: int = 0) -> str:
  """'loss 3.5212 (bce 1.1640, adv1 0.2805, adv2 2.0767)': only the terms
  the method has (phase 1 and `none`: the loss alone, which is the BCE)."""
  adv = [k for k in ("adv1", "adv2") if avg.get(k, 0.0) != 0.0]
  terms = ", ".join(f"{k} {avg[k]:.4f}" for k in ["bce"] + adv) if adv else ""
  if runs:
    terms += f"{'; ' if terms else ''}mean of {runs} runs"
  return f"loss {avg['loss']:.4f}" + (f" ({terms})" if terms else "")


def _compiles(fn) -> bool:
  """Whether the next call of jitted `fn` compiles it (nothing in its
  in-memory cache yet; False when that cannot be told, e.g. a program
  compiled ahead of time). A `train.make_train_epoch` epoch carries its
  jitted program as `fn.program`."""
  size = getattr(getattr(fn, "program", fn), "_cache_size", None)
  return size is not None and size() == 0


@contextlib.contextmanager
def _heartbeat(what: str, every: float):
  """Logs "`what`: N s so far" every `every` seconds until the block ends,
  so that a long compilation is not a silence (`every` <= 0: nothing)."""
  if every <= 0:
    yield
    return
  done, t0 = threading.Event(), time.time()

  def beat():
    while not done.wait(every):
      logging.info("%s: %.0f s so far", what, time.time() - t0)

  thread = threading.Thread(target=beat, daemon=True)
  thread.start()
  try:
    yield
  finally:
    done.set()
    thread.join()


def _cache_note() -> str:
  """Where compiled programs are kept for later runs, if anywhere."""
  path = jax.config.jax_compilation_cache_dir
  return f" (kept in {path} for later runs)" if path else ""


def order_key(config, epoch: int) -> jax.Array:
  """The key that orders the length buckets' batches in `epoch` (shared by
  all runs of a vectorized group; see `batching`)."""
  return jax.random.fold_in(jax.random.PRNGKey(config.train.order_seed),
                            epoch)


def _train_epochs(runs: _Runs, state, start, epochs, epoch_fn, pert, data,
                  validate, config, preemption=None):
  """The epoch loop of `run_phase`; returns the final state.

  Stops after `epochs`, or once every run has gone `patience` evaluations
  without a better validation metric (a run that stops early keeps its
  checkpoints while the others of its group train on). On a signal
  (`checkpoints.Preemption`) it saves `latest` at the end of the epoch and
  raises `checkpoints.Interrupted`.
  """
  phase, select = runs.phase, runs.select
  eval_every = phase_eval_every(config, phase)
  patience = phase_patience(config, phase)
  for epoch in range(start + 1, epochs + 1):
    active = runs.active(patience)
    if not active:
      break
    first = epoch == start + 1
    # The first epoch of a process waits for its program (compiling, or
    # compiled ahead on another thread): say so while it lasts.
    with _heartbeat(f"[{phase}] epoch {epoch}/{epochs}, with its program's "
                    "compilation", config.train.heartbeat_s if first else 0):
      if first and _compiles(epoch_fn):
        logging.info("[%s] compiling this phase's training program%s, then "
                     "training epoch %d/%d", phase, _cache_note(), epoch,
                     epochs)
      t0 = time.time()
      step0 = int(np.ravel(jax.device_get(state.step))[0])
      state, terms = epoch_fn(state, data, pert, runs.epoch_key(epoch),
                              order_key(config, epoch))
      terms = runs.split(jax.device_get(terms))  # the one host sync
    for r in active:
      _check_finite(terms[r], step0, phase, runs.where(r))
    dt = time.time() - t0
    n_steps = len(terms[0]["loss"]) * len(runs)
    means = [{k: float(np.mean(v)) for k, v in t.items()} for t in terms]
    avg = {k: np.mean([means[r][k] for r in active]) for k in means[0]}
    losses_line = _losses_line(avg, len(active) if runs.stacked else 0)
    if epoch == start + 1:
      # The first epoch of a process includes compiling the epoch; it is
      # reported on its own and left out of throughput and ETA.
      logging.info("[%s] epoch %d/%d %s; %.1f s including compilation",
                   phase, epoch, epochs, losses_line, dt)
      t_timed, timed_epochs = time.time(), 0
    else:
      timed_epochs += 1
      if epoch % config.train.log_every == 0 or epoch == epochs:
        per_epoch = (time.time() - t_timed) / timed_epochs
        logging.info("[%s] epoch %d/%d %s %.1f steps/s, %.2f s/epoch, "
                     "ETA %s", phase, epoch, epochs, losses_line,
                     n_steps / dt, dt, _duration(per_epoch * (epochs - epoch)))
    if epoch % eval_every == 0 or epoch == epochs:
      t_eval = time.time()
      vals = validate(state.params)
      eval_s = time.time() - t_eval
      parts = runs.split(state)
      now = time.time()
      spent, runs.counted_until = now - runs.counted_until, now
      for r in active:
        val, sel = vals[r], runs.selection[r]
        sel.train_s += spent
        if sel.update(epoch, val[select]):
          checkpoints.save(runs.best[r], epoch, parts[r], wait=True)
        # The record goes first: a kill before the latest checkpoint is on
        # disk retrains to this epoch, whose evaluation is then not counted
        # twice (`Selection.last_eval`).
        checkpoints.write_json(checkpoints.selection_path(runs.pdirs[r]),
                               sel.to_json(), indent=None)
        checkpoints.save(runs.latest[r], epoch, parts[r])
        runs.writers[r].write(
            {"phase": phase, "epoch": epoch, "step": step0 + len(
                terms[r]["loss"]),
             **{f"train/{k}": v for k, v in means[r].items()},
             **{f"valid/{k}": v for k, v in val.items()},
             "steps_per_s": n_steps / dt, "epoch_s": dt, "eval_s": eval_s})
        logging.info("[%s] epoch %d valid%s %s", phase, epoch, runs.where(r),
                     report.metrics_line(val))
        if sel.stopped(patience):
          logging.info("[%s]%s early stop at epoch %d: no better %s in %d "
                       "evaluations (best %.4f at epoch %d)", phase,
                       runs.where(r), epoch, select, patience, sel.value,
                       sel.epoch)
    signum = preemption.reached(runs.latest[0], epoch) if preemption else 0
    if signum:
      parts = runs.split(state)
      for r in active:
        if runs.latest[r].latest_step() != epoch:
          checkpoints.save(runs.latest[r], epoch, parts[r])
      runs.wait()
      raise checkpoints.Interrupted(phase, epoch, signum)
  return state


# Per (phase, run): the global step right after its state was restored, and
# the checkpoint it came from; a non-finite loss in the epoch that follows
# names that checkpoint (`_check_finite`).
_RESTORED = {}


def _restore_intact(runs: _Runs, state, patience: int):
  """(state, epoch of each run) from the runs' intact checkpoints.

  A damaged checkpoint is moved aside and the next one tried: the older
  `latest`, the selected `best`, the phase start
  (`checkpoints.RunCheckpoints.rank`); one line per run says what was
  damaged and where training resumes. Stacked runs that still train resume
  at one epoch that each of them has intact, the first in that order for
  the run that lost most.
  """
  ckpts = [checkpoints.RunCheckpoints(
      runs.latest[r], runs.best[r], runs.selection[r], runs.take(state, r),
      runs.pdirs[r]) for r in range(len(runs))]
  for r, c in enumerate(ckpts):
    runs.selection[r] = c.check_selection()
  active = runs.active(patience)
  found = {r: ckpts[r].first() for r in range(len(runs)) if r not in active}
  while active:
    epoch = min(set.intersection(*(ckpts[r].epochs() for r in active)),
                key=lambda e: max(ckpts[r].rank(e) for r in active))
    got = {r: ckpts[r].state_at(epoch) for r in active}
    if all(got.values()):
      found.update(got)
      break
  for r in active:
    ckpts[r].set_aside_after(found[r].epoch)
  for r, c in enumerate(ckpts):
    where, f = runs.where(r), found[r]
    c.settle(f)
    if f.epoch > 0:
      _RESTORED[(runs.phase, where)] = (
          int(np.ravel(jax.device_get(f.state.step))[0]),
          os.path.join(runs.pdirs[r], f.source))
    if c.notes:
      logging.warning("[%s]%s %s; training resumes from %s (epoch %d)",
                      runs.phase, where, "; ".join(c.notes), f.source,
                      f.epoch)
  return (runs.join([found[r].state for r in range(len(runs))]),
          [found[r].epoch for r in range(len(runs))])


def _resume(runs: _Runs, state, patience: int):
  """(state, start epoch) from the runs' latest checkpoints, if any.

  Runs that stopped early are finished; the others must have been saved at
  the same epoch. Damaged checkpoints are moved aside and training falls
  back to an intact state (`_restore_intact`).
  """
  _RESTORED.clear()
  steps = [m.latest_step() for m in runs.latest]
  if all(s is None for s in steps):
    return state, 0
  if any(s is None for s in steps):
    raise ValueError(
        f"[{runs.phase}] some of the runs in {runs.pdirs} have no checkpoint "
        f"({steps}); resume them one at a time with launch.py.")
  going = {steps[r] for r in runs.active(patience)}
  if len(going) > 1:
    raise ValueError(
        f"[{runs.phase}] the runs in {runs.pdirs} were saved at different "
        f"epochs ({steps}); resume them one at a time with launch.py.")
  state, steps = _restore_intact(runs, state, patience)
  going = {steps[r] for r in runs.active(patience)}
  for r, sel in enumerate(runs.selection):
    best = (f"best validation {runs.select} so far {sel.value:.4f}, at "
            f"epoch {sel.epoch}" if sel.epoch >= 0 else "not validated yet")
    logging.info("[%s] resumed%s from epoch %d (%s)%s", runs.phase,
                 runs.where(r), steps[r], best,
                 "; it had stopped early" if sel.stopped(patience) else "")
  return state, int(max(going or steps))


def run_phase(phase: str, state, epochs: int, epoch_fn, pert,
              data: dict, ranker, config, workdirs, writers, root_keys,
              stacked: bool = False, preemption=None):
  """Trains `epochs` epochs (resuming), selects on validation, tests once.

  `workdirs`, `writers` and `root_keys` hold one entry per run. With one run
  and `stacked=False`, `state` has no run axis; with `stacked=True` it has a
  leading run axis R (an `epoch_fn` and `ranker` built with `runs=True`).
  Each run is selected and tested on its own. With a patience
  (`train.patience` / `adv.patience`), training stops early once a run's
  validation metric has not improved for that many evaluations.

  Returns (final state, selected state, [results dict of this phase, one
  per run]). The selected state is each run's best-on-validation checkpoint.
  """
  select = config.eval.select
  patience = phase_patience(config, phase)
  runs = _Runs(phase, workdirs, writers, root_keys, stacked, select)
  results_paths = [os.path.join(p, "results.json") for p in runs.pdirs]

  def selected_state(template):
    for r, sel in enumerate(runs.selection):
      if sel.epoch < 0:
        raise RuntimeError(f"[{phase}]{runs.where(r)} no evaluation was run; "
                           "nothing to test.")
    return runs.join([
        checkpoints.RunCheckpoints(runs.latest[r], runs.best[r], sel, None,
                                   runs.pdirs[r]).selected(
                                       runs.take(template, r))
        for r, sel in enumerate(runs.selection)])

  try:
    state, start = _resume(runs, state, patience)
    finished = start >= epochs or not runs.active(patience)
    if finished and all(map(os.path.exists, results_paths)):
      return state, selected_state(state), [
          checkpoints.read_json(p) for p in results_paths]

    def validate(params):
      compiles = _compiles(ranker)
      if compiles:
        logging.info("[%s] compiling the ranking program for validation",
                     phase)
      with _heartbeat(f"[{phase}] validation, with its program's compilation",
                      config.train.heartbeat_s if compiles else 0):
        r = np.asarray(ranker(params, *evaluate.split_inputs(data, "valid"),
                              data["history"]))
      return [evaluate.summarize(x, config.eval.ks)
              for x in (r if stacked else [r])]

    runs.counted_until = time.time()
    try:
      state = _train_epochs(runs, state, start, epochs, epoch_fn, pert, data,
                            validate, config, preemption)
    finally:
      # Saves are asynchronous: finish them even when training stops early
      # (a NaN, Ctrl-C), so that the last good checkpoint is complete on disk.
      runs.wait()

    # The test split is read here, once, for each run's selected checkpoint.
    selected = selected_state(state)
    ranks = np.asarray(ranker(selected.params,
                              *evaluate.split_inputs(data, "test"),
                              data["history"]))
    out = []
    for r, x in enumerate(ranks if stacked else [ranks]):
      test = evaluate.summarize(x, config.eval.ks)
      sel = runs.selection[r]
      results = {"phase": phase, "selected_epoch": sel.epoch,
                 f"valid/{select}": sel.value,
                 **{f"test/{k}": v for k, v in test.items()},
                 "last_epoch": sel.last_eval,
                 "stopped_early": sel.stopped(patience),
                 # Every process's time, with this one's test evaluation.
                 "train_s": sel.train_s + time.time() - runs.counted_until}
      runs.writers[r].write({"phase": phase, "epoch": sel.epoch,
                             "split": "test",
                             **{f"test/{k}": v for k, v in test.items()}})
      checkpoints.write_json(results_paths[r], results)
      logging.info("[%s]%s selected epoch %d; test %s", phase, runs.where(r),
                   sel.epoch, report.metrics_line(test))
      out.append(results)
    return state, selected, out
  finally:
    runs.close()
