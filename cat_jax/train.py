"""Training: the jitted epoch, the two-phase schedule, checkpoints, selection.

Phase 1 ('pretrain') trains the base model with BCE (Eq. 3.5) for
`train.epochs`; phase 2 trains `adv.method` from the phase-1 state for
`adv.epochs` (Tan et al., Sec. 5.1: 500 + 100 epochs). Each phase keeps its own
Orbax checkpoints (latest and best-on-validation) under
`workdir/<phase>/`, so a killed run restarts from its latest checkpoint and a
sweep over methods in one workdir pretrains once.

Model selection uses validation NDCG@10 only; the test split is read once per
phase, for the selected checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from cat_jax import adversarial, batching, cascade, checkpoints
from cat_jax import data as data_lib
from cat_jax import evaluate, models
from cat_jax import recommend, report
from cat_jax import sampling, sharding
from cat_jax.writer import JsonlWriter, is_chief


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree, donated to the step."""
  step: jax.Array
  params: Any
  opt_state: Any


def make_optimizer(tcfg) -> optax.GradientTransformation:
  """Adam with coupled L2 (torch `Adam(weight_decay=l2)`), Sec. 5.1 settings."""
  return optax.chain(optax.add_decayed_weights(tcfg.l2),
                     optax.adam(tcfg.lr, b1=tcfg.b1, b2=tcfg.b2))


def init_state(model, optimizer, rng, max_len: int) -> TrainState:
  params = model.init(rng, jnp.ones((1, max_len), jnp.int32))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params))


def init_states(model, optimizer, keys, max_len: int) -> TrainState:
  """Independent TrainStates stacked over a leading run axis, one per key."""
  return jax.vmap(lambda k: init_state(model, optimizer, k, max_len))(keys)


# The device tables moved to `batching`; these names stay for callers.
device_data = batching.device_data
sharded_device_data = batching.sharded_device_data


def make_train_epoch(objective, optimizer, num_items: int,
                     plan: batching.TrainPlan, mesh=None, runs: bool = False):
  """Jitted `epoch(state, data, pert, key, order_key) -> (state, terms)`.

  One epoch is a `lax.scan` over the plan's steps with nothing crossing to
  the host: users are shuffled on device (`batching.epoch_order`), a batch
  of length bucket b runs on the last T_b columns of its windows (a
  `lax.switch` over the buckets, all compiled into this one program), the
  fill of each bucket's last batch gets weight 0, and negatives are sampled
  on device. `pert` is the [U, T] level-1 weight table. `terms` holds each
  loss term per step ([steps] arrays). With a `mesh`, each batch is split
  across its devices (data parallel) and everything else is replicated.

  `key` is the run's key (users, negatives, dropout, perturbations);
  `order_key` orders the buckets' batches and is shared by all runs.

  With `runs=True` the epoch trains several independent runs at once: `state`
  is stacked over a leading run axis (see `init_states`) and `key` is [R, 2];
  each run keeps its own data order, negatives and dropout, and `terms` are
  [R, steps]. One small model leaves an accelerator mostly idle, so seeds
  share one program this way.
  """
  sharding.check_divisible(plan.batch_size, mesh, "train.batch_size")

  def epoch(state, data, pert, key, order_key):
    perm_key, step_key = jax.random.split(key)
    buckets, idx, real = batching.epoch_order(plan, perm_key, order_key)
    keys = jax.random.split(step_key, plan.num_steps)
    T = data["train_inputs"].shape[1]

    def at_length(t):
      """The train step on windows cut to their last t columns."""
      def step(state, u, real_user, k):
        neg_key, obj_key = jax.random.split(k)
        cols = slice(T - t, T)
        targets = data["train_targets"][u][:, cols]
        batch = {
            "inputs": data["train_inputs"][u][:, cols],
            "targets": targets,
            "negatives": sampling.sample_negatives(
                neg_key, data["history"][u], targets.shape, num_items),
            "weights": ((targets > 0) & real_user[:, None]).astype(
                jnp.float32),
            "pert": pert[u][:, cols],
        }
        grads, terms = jax.grad(objective, has_aux=True)(
            state.params, batch, obj_key)
        updates, opt_state = optimizer.update(grads, state.opt_state,
                                              state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state), terms
      return step

    branches = [at_length(t) for t in plan.lengths]

    def step(state, xs):
      b, u, real_user, k = xs
      u = sharding.shard_rows(u, mesh)
      if len(branches) == 1:
        return branches[0](state, u, real_user, k)
      return jax.lax.switch(b, branches, state, u, real_user, k)

    return jax.lax.scan(step, state, (buckets, idx, real, keys))

  if runs:
    epoch = jax.vmap(epoch, in_axes=(0, None, None, 0, None))
  return jax.jit(epoch, donate_argnums=0), plan.num_steps


# ----------------------------------------------------------------------------
# One phase.
# ----------------------------------------------------------------------------

# Kept for callers of the old names.
_manager = checkpoints.manager
restore = checkpoints.restore


class NonFiniteLoss(FloatingPointError):
  pass


def _check_finite(terms: dict, step0: int, phase: str, where: str = ""):
  loss = np.asarray(terms["loss"])
  bad = np.flatnonzero(~np.isfinite(loss))
  if len(bad):
    i = int(bad[0])
    named = ", ".join(f"{k}={float(np.asarray(v)[i]):.4g}"
                      for k, v in sorted(terms.items()))
    raise NonFiniteLoss(
        f"Non-finite loss in phase {phase!r}{where} at step {step0 + i + 1} "
        f"({named}). The last good checkpoint is kept; lower train.lr or "
        "adv.eps and restart.")


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
    losses_line = "loss %.4f (bce %.4f adv1 %.4f adv2 %.4f%s)" % (
        avg["loss"], avg["bce"], avg["adv1"], avg["adv2"],
        f"; mean of {len(active)} runs" if runs.stacked else "")
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
      for r in active:
        val, sel = vals[r], runs.selection[r]
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


def _resume(runs: _Runs, state, patience: int):
  """(state, start epoch) from the runs' latest checkpoints, if any.

  Runs that stopped early are finished; the others must have been saved at
  the same epoch.
  """
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
  state = runs.join([checkpoints.restore(m, runs.take(state, r))
                     for r, m in enumerate(runs.latest)])
  for r, sel in enumerate(runs.selection):
    logging.info("[%s] resumed%s from epoch %d (best %s %.4f at epoch %d%s)",
                 runs.phase, runs.where(r), steps[r], runs.select, sel.value,
                 sel.epoch, ", stopped early" if sel.stopped(patience) else "")
  return state, int(max(going or steps))


def run_phase(phase: str, state: TrainState, epochs: int, epoch_fn, pert,
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
        checkpoints.restore(runs.best[r], runs.take(template, r),
                            step=sel.epoch)
        for r, sel in enumerate(runs.selection)])

  try:
    state, start = _resume(runs, state, patience)
    finished = start >= epochs or not runs.active(patience)
    if finished and all(map(os.path.exists, results_paths)):
      return state, selected_state(state), [
          checkpoints.read_json(p) for p in results_paths]

    def validate(params):
      r = np.asarray(ranker(params, *evaluate.split_inputs(data, "valid"),
                            data["history"]))
      return [evaluate.summarize(x, config.eval.ks)
              for x in (r if stacked else [r])]

    t_phase = time.time()
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
                 "train_s": time.time() - t_phase}
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


# ----------------------------------------------------------------------------
# Entry point.
# ----------------------------------------------------------------------------


def adv_config(config) -> adversarial.AdvConfig:
  a = config.adv
  return adversarial.method_config(a.method, a.eps, a.lambda1, a.lambda2,
                                   a.xi, a.scope, a.relative,
                                   direction=a.get("direction", "input"),
                                   budget=a.get("budget", "equal"))


MATMUL_PRECISIONS = ("default", "float32", "tensorfloat32", "bfloat16")
ADV_INITS = ("last", "best")


def matmul_precision(config):
  """Context for config.train.matmul_precision (traced code picks it up)."""
  p = config.train.matmul_precision
  return (contextlib.nullcontext() if p == "default"
          else jax.default_matmul_precision(p))


def validate_config(config):
  """Fails fast, before any data is read, on values that cannot work."""
  if config.model.name not in models.MODELS:
    raise ValueError(f"Unknown model.name {config.model.name!r}; choose one "
                     f"of {models.MODELS}.")
  adv_config(config)
  if config.model.dtype not in models.DTYPES:
    raise ValueError(f"Unknown model.dtype {config.model.dtype!r}; choose "
                     f"one of {tuple(models.DTYPES)}.")
  if config.train.matmul_precision not in MATMUL_PRECISIONS:
    raise ValueError(f"Unknown train.matmul_precision "
                     f"{config.train.matmul_precision!r}; choose one of "
                     f"{MATMUL_PRECISIONS}.")
  if config.eval.shard_items and not config.eval.item_chunk:
    raise ValueError("eval.shard_items needs eval.item_chunk > 0 (the items "
                     "of each device are scored item_chunk at a time).")
  for name in ("epochs", "batch_size", "eval_every", "log_every"):
    if config.train[name] < (0 if name == "epochs" else 1):
      raise ValueError(f"train.{name} must be positive, got "
                       f"{config.train[name]}.")
  for name in ("patience", "order_seed"):
    if config.train[name] < 0:
      raise ValueError(f"train.{name} must be >= 0, got "
                       f"{config.train[name]}.")
  for section in ("train", "eval"):
    if config[section].buckets < 1:
      raise ValueError(f"{section}.buckets must be >= 1 (1 = off), got "
                       f"{config[section].buckets}.")
  if config.adv.patience < 0:
    raise ValueError(f"adv.patience must be >= 0, got {config.adv.patience}.")
  if config.adv.init not in ADV_INITS:
    raise ValueError(f"Unknown adv.init {config.adv.init!r}; choose one of "
                     f"{ADV_INITS}.")
  if config.adv.epochs < 0:
    raise ValueError(f"adv.epochs must be >= 0, got {config.adv.epochs}.")
  if config.adv.eval_every < 0:
    raise ValueError("adv.eval_every must be >= 0 (0 = train.eval_every), "
                     f"got {config.adv.eval_every}.")
  if config.train.epochs == 0 and not config.train.pretrain_dir and \
      config.adv.epochs == 0:
    raise ValueError("Nothing to train: train.epochs and adv.epochs are 0.")
  ks = tuple(config.eval.ks)
  if config.eval.select not in [f"{m}@{k}" for m in ("ndcg", "hr")
                                for k in ks] + ["mrr"]:
    raise ValueError(f"eval.select {config.eval.select!r} is not one of the "
                     f"reported metrics for eval.ks={ks}.")


def _update_json(path: str, key: str, value: dict):
  """Sets one key of a JSON file (results.json), atomically."""
  content = checkpoints.read_json(path, {})
  content[key] = value
  checkpoints.write_json(path, content)


def selected_params(config, workdir: str, phase: str, num_items: int):
  """(model, params) of a phase's selected (best-on-validation) checkpoint.

  Needs no data file: the model is rebuilt from `config` (the run's
  resolved config.json) and `num_items` (N), and `<workdir>/<phase>/best` is
  restored.
  """
  epoch = checkpoints.best_epoch(workdir, phase)
  T = config.data.max_len
  model = models.build_model(config.model, num_items, T)
  template = init_state(model, make_optimizer(config.train),
                        jax.random.PRNGKey(0), T)
  manager = checkpoints.manager(os.path.join(workdir, phase, "best"))
  try:
    state = checkpoints.restore(manager, template, step=epoch)
  finally:
    manager.close()
  return model, state.params


def load_selected(config, workdir: str, phase: str):
  """(model, params, data, num_items) of a phase's selected checkpoint.

  For analyses after training (robustness, figures): rebuilds the data and
  model from `config` and restores `<workdir>/<phase>/best`.
  """
  checkpoints.best_epoch(workdir, phase)  # fail before reading the data
  arrays = data_lib.build_arrays(data_lib.load_from_config(config.data),
                                 config.data.max_len)
  model, params = selected_params(config, workdir, phase, arrays.num_items)
  return model, params, device_data(arrays), arrays.num_items


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       retrain: bool = False) -> dict:
  """Runs phase 1 and (if adv.epochs > 0) phase 2; returns results.json.

  `retrain=True` deletes and retrains the phases of `workdir` that were
  trained under other settings, instead of refusing (see `checkpoints`).
  """
  pre = config.train.pretrain_dir
  return train_runs(config, [workdir], [config.seed],
                    [pre] if pre else None, retrain=retrain)[0]


def train_runs(config: ml_collections.ConfigDict, workdirs, seeds,
               pretrain_dirs=None, retrain: bool = False) -> list:
  """Trains one run per seed, all in one vectorized program (`jax.vmap`).

  Each run gives what `train_and_evaluate` gives for that seed alone (same
  keys, data order, negatives, selection; equal up to float reordering) and
  writes the same files under its own workdir, so runs can be resumed, or
  analysed, one at a time. `config.seed` and `config.train.pretrain_dir` are
  replaced by `seeds` and `pretrain_dirs` (None: each workdir pretrains).
  A single run is trained without the run axis.

  Nothing is written before the config, the workdirs
  (`checkpoints.check_workdir`) and the data have been checked.

  Returns:
    One results dict (as in results.json) per run.
  """
  validate_config(config)
  with matmul_precision(config):
    return _train_runs(config, workdirs, seeds, pretrain_dirs, retrain)


def make_plans(config, ds: data_lib.Dataset, data: dict):
  """(training plan, evaluation plan or None) of the length buckets.

  `train.buckets` / `train.bucket_lengths` bucket the training windows and
  `eval.buckets` the evaluation windows (1 = off: every window at T).
  """
  T, B = config.data.max_len, config.train.batch_size
  users = data_lib.train_user_index(ds)
  if len(users) == 0:
    raise data_lib.DataError("No user has two training items to learn from.")
  lengths = batching.train_window_lengths(ds, users, T)
  bounds = batching.bucket_lengths(lengths, T, config.train.buckets, B,
                                   tuple(config.train.bucket_lengths))
  plan = batching.train_plan(users, lengths, bounds, B)
  if config.eval.buckets <= 1:
    return plan, None
  elens = batching.test_window_lengths(ds, T,
                                       int(data["test_targets"].shape[0]))
  ebounds = batching.choose_buckets(elens[elens > 0], config.eval.buckets,
                                    config.eval.batch_size)
  return plan, batching.eval_plan(elens, ebounds)


# Fewer evaluation users than this make every metric noise (one user moves
# NDCG@10 by up to 1/users); the run warns.
MIN_EVAL_USERS = 100


def _train_runs(config, workdirs, seeds, pretrain_dirs, retrain) -> list:
  if len(workdirs) != len(seeds) or len(set(map(os.path.abspath,
                                                workdirs))) != len(workdirs):
    raise ValueError(f"Need one distinct workdir per seed; got {workdirs} "
                     f"for seeds {list(seeds)}.")
  stacked = len(seeds) > 1
  reuse = pretrain_dirs is not None
  pre_dirs = list(pretrain_dirs) if reuse else list(workdirs)
  run_configs = []
  for seed, pre in zip(seeds, pre_dirs):
    c = config.copy_and_resolve_references()
    c.seed = seed
    c.train.pretrain_dir = pre if reuse else ""
    run_configs.append(c)
  checks = [checkpoints.check_workdir(c, w, pre, reuse, retrain)
            for c, w, pre in zip(run_configs, workdirs, pre_dirs)]

  t0 = time.time()
  ds = data_lib.load_from_config(config.data)
  stats = data_lib.describe(ds)
  mesh = sharding.make_mesh(config.parallel.devices)
  if config.parallel.shard_data:
    data = sharded_device_data(ds, config.data.max_len, mesh)
  else:
    data = sharding.replicate(
        device_data(data_lib.build_arrays(ds, config.data.max_len)), mesh)
  logging.info("data: %s (%.1f s)", stats, time.time() - t0)
  n_eval = len(data_lib.eval_user_index(ds))
  if n_eval < MIN_EVAL_USERS:
    logging.warning(
        "only %d users have a validation and a test item (fewer than %d): "
        "each one moves NDCG@10 by up to 1/%d, so the metrics of this run "
        "are mostly noise.", n_eval, MIN_EVAL_USERS, max(n_eval, 1))
  plan, eval_plan = make_plans(config, ds, data)

  # Everything is checked; from here on the run writes.
  for check, w, c in zip(checks, workdirs, run_configs):
    checkpoints.apply_deletions(check, [w])
    if is_chief():
      os.makedirs(w, exist_ok=True)
      checkpoints.write_json(os.path.join(w, "config.json"),
                             json.loads(c.to_json_best_effort()))
      recommend.write_item_ids(w, ds)
  writers = [JsonlWriter(os.path.join(w, "metrics.jsonl")) for w in workdirs]
  try:
    with checkpoints.Preemption() as preemption:
      return _train_phases(config, run_configs, workdirs, pre_dirs, seeds,
                           stacked, ds, stats, data, mesh, plan, eval_plan,
                           writers, preemption)
  finally:
    for wr in writers:
      wr.close()


def _train_phases(config, run_configs, workdirs, pre_dirs, seeds, stacked,
                  ds, stats, data, mesh, plan, eval_plan, writers,
                  preemption) -> list:
  """Phase 1, then phase 2, for checked and prepared workdirs."""
  N, T = ds.num_items, config.data.max_len
  model = models.build_model(config.model, N, T)
  optimizer = make_optimizer(config.train)
  keys = [jax.random.split(jax.random.PRNGKey(s), 3) for s in seeds]
  init_keys, pre_keys, adv_keys = ([k[i] for k in keys] for i in range(3))
  if stacked:
    state = init_states(model, optimizer, jnp.stack(init_keys), T)
  else:
    state = init_state(model, optimizer, init_keys[0], T)
  state = sharding.replicate(state, mesh)
  if config.eval.item_chunk:
    if stacked:
      raise ValueError("eval.item_chunk is not supported with several runs "
                       "in one program; train the seeds one at a time.")
    ranker = evaluate.make_chunked_ranker(model, N, config.eval.batch_size,
                                          config.eval.item_chunk, mesh,
                                          config.eval.shard_items,
                                          plan=eval_plan)
  else:
    ranker = evaluate.make_ranker(evaluate.model_scores(model), N,
                                  config.eval.batch_size, mesh, runs=stacked,
                                  plan=eval_plan)
  popularity = evaluate.evaluate_popularity(data, N, config.eval.batch_size,
                                            config.eval.ks, mesh=mesh)
  results = [{"data": stats, "popularity/valid": popularity} for _ in seeds]
  def phase(state, name, epochs, objective, pert, out_dirs, phase_keys):
    epoch_fn, _ = make_train_epoch(objective, optimizer, N, plan, mesh,
                                   runs=stacked)
    return run_phase(name, state, epochs, epoch_fn, pert, data, ranker,
                     config, out_dirs, writers, phase_keys, stacked,
                     preemption)

  # Phase 1: base model.
  uniform = (data["train_inputs"] > 0).astype(jnp.float32)
  logging.info("%d train users, %d steps/epoch (%s), %d items, T=%d, "
               "%d devices, %d run(s)", len(plan.users), plan.num_steps,
               plan.describe(), N, T, mesh.size, len(seeds))
  if eval_plan is not None:
    logging.info("evaluation buckets: %s", ", ".join(
        f"T={t}: {len(r)} users"
        for t, r in zip(eval_plan.lengths, eval_plan.rows)))
  if config.train.epochs > 0:
    for c, pre in zip(run_configs, pre_dirs):
      pdir = os.path.join(pre, checkpoints.PRETRAIN)
      if not os.path.exists(os.path.join(pdir, "signature.json")):
        checkpoints.write_signature(c, pdir, checkpoints.PRETRAIN)
    state, best, res = phase(state, "pretrain", config.train.epochs,
                             adversarial.make_objective(
                                 model, adversarial.method_config("none")),
                             uniform, pre_dirs, pre_keys)
    if config.adv.init == "best":
      state = best
    for w, r, x in zip(workdirs, results, res):
      r["pretrain"] = x
      _update_json(os.path.join(w, "results.json"), "pretrain", x)

  # Phase 2: adversarial method from the phase-1 state.
  if config.adv.epochs > 0:
    method = config.adv.method
    t_c = time.time()
    pert = cascade.weights_for_method(data["train_inputs"],
                                      config.train.batch_size, method,
                                      num_users=ds.num_users)
    logging.info("level-1 weights for %s in %.2f s", method, time.time() - t_c)
    for c, w, pre in zip(run_configs, workdirs, pre_dirs):
      mdir = os.path.join(w, method)
      if not os.path.exists(os.path.join(mdir, "signature.json")):
        checkpoints.write_signature(
            c, mdir, method, checkpoints.phase1_end(
                os.path.join(pre, checkpoints.PRETRAIN), c))
    state, _, res = phase(state, method, config.adv.epochs,
                          adversarial.make_objective(model,
                                                     adv_config(config)),
                          pert, workdirs, adv_keys)
    for w, r, x in zip(workdirs, results, res):
      r[method] = x
      _update_json(os.path.join(w, "results.json"), method, x)
  for w in workdirs:
    _update_json(os.path.join(w, "results.json"), "data", stats)
    _update_json(os.path.join(w, "results.json"), "popularity/valid",
                 popularity)
  return results
