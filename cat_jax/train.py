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
import hashlib
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

from cat_jax import adversarial, cascade, data as data_lib, evaluate, models
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


def device_data(arrays: data_lib.Arrays) -> dict:
  """Puts the training and evaluation arrays on the (default) device once."""
  return {k: jnp.asarray(getattr(arrays, k)) for k in (
      "train_inputs", "train_targets", "history", "train_users", "eval_users",
      "valid_inputs", "valid_targets", "test_inputs", "test_targets")}


def sharded_device_data(ds: data_lib.Dataset, max_len: int, mesh) -> dict:
  """The tables of `device_data`, split by rows (users) over `mesh`.

  Each device holds 1/D of the user tables (training windows, histories,
  evaluation windows), and each process builds only the rows of its own
  devices: on several hosts no process holds every user's padded tables.
  Only `train_users` (one int per user) is replicated. Tables are padded to a
  multiple of the device count with empty rows: no training target, and an
  evaluation target of 0, which evaluation skips. Under `jit`, XLA gathers a
  batch from the sharded tables with a masked local gather and a sum, so
  results equal those of replicated tables.
  """
  data_lib.check_users(ds)
  n = mesh.size
  pad = lambda k: max(n, -(-k // n) * n)
  U, T, H = ds.num_users, max_len, data_lib.history_width(ds)
  eval_users = data_lib.eval_user_index(ds)
  E = len(eval_users)
  eval_users = np.concatenate(
      [eval_users, np.full(pad(E) - E, -1, np.int32)])
  cache = {}

  def rows_of(kind, index):
    sl = index[0]
    key = (kind, sl.start, sl.stop)
    if key not in cache:  # one build per device slice, shared by its tables
      if kind == "train":
        cache[key] = data_lib.train_rows(ds, np.arange(pad(U))[sl], T, H)
      else:
        cache[key] = data_lib.eval_rows(ds, eval_users[sl], T)
    return cache[key]

  def table(kind, i, shape):
    return jax.make_array_from_callback(
        shape, sharding.rows(mesh), lambda index: rows_of(kind, index)[i])

  d = {"train_inputs": table("train", 0, (pad(U), T)),
       "train_targets": table("train", 1, (pad(U), T)),
       "history": table("train", 2, (pad(U), H)),
       "valid_inputs": table("eval", 0, (pad(E), T)),
       "valid_targets": table("eval", 1, (pad(E),)),
       "test_inputs": table("eval", 2, (pad(E), T)),
       "test_targets": table("eval", 3, (pad(E),))}
  d["eval_users"] = jax.make_array_from_callback(
      (pad(E),), sharding.rows(mesh),
      lambda index: np.maximum(eval_users[index[0]], 0))
  d["train_users"] = sharding.replicate(
      jnp.asarray(data_lib.train_user_index(ds)), mesh)
  built = sum(k[2] - k[1] for k in cache if k[0] == "train")
  logging.info("process %d built %d of %d user rows (row-sharded tables)",
               jax.process_index(), built, pad(U))
  return d


def make_train_epoch(objective, optimizer, num_items: int, batch_size: int,
                     num_train_users: int, mesh=None, runs: bool = False):
  """Jitted `epoch(state, data, pert, key) -> (state, terms)`.

  One epoch is a `lax.scan` over ceil(users / batch_size) steps with nothing
  crossing to the host: users are permuted on device, the last batch is
  filled with repeated users that get weight 0, and negatives are sampled on
  device. `pert` is the [U, T] level-1 weight table. `terms` holds each loss
  term per step ([steps] arrays). With a `mesh`, each batch is split across
  its devices (data parallel) and everything else is replicated.

  With `runs=True` the epoch trains several independent runs at once: `state`
  is stacked over a leading run axis (see `init_states`) and `key` is [R, 2];
  each run keeps its own data order, negatives and dropout, and `terms` are
  [R, steps]. One small model leaves an accelerator mostly idle, so seeds
  share one program this way.
  """
  sharding.check_divisible(batch_size, mesh, "train.batch_size")
  num_steps = -(-num_train_users // batch_size)

  def epoch(state, data, pert, key):
    perm_key, step_key = jax.random.split(key)
    users = data["train_users"]
    order = users[jax.random.permutation(perm_key, users.shape[0])]
    slots = jnp.arange(num_steps * batch_size)
    idx = order[slots % users.shape[0]].reshape(num_steps, batch_size)
    real = (slots < users.shape[0]).reshape(num_steps, batch_size)
    keys = jax.random.split(step_key, num_steps)

    def step(state, xs):
      u, real_user, k = xs
      u = sharding.shard_rows(u, mesh)
      neg_key, obj_key = jax.random.split(k)
      targets = data["train_targets"][u]
      batch = {
          "inputs": data["train_inputs"][u],
          "targets": targets,
          "negatives": sampling.sample_negatives(
              neg_key, data["history"][u], targets.shape, num_items),
          "weights": ((targets > 0) & real_user[:, None]).astype(jnp.float32),
          "pert": pert[u],
      }
      grads, terms = jax.grad(objective, has_aux=True)(
          state.params, batch, obj_key)
      updates, opt_state = optimizer.update(grads, state.opt_state,
                                            state.params)
      params = optax.apply_updates(state.params, updates)
      return TrainState(state.step + 1, params, opt_state), terms

    return jax.lax.scan(step, state, (idx, real, keys))

  if runs:
    epoch = jax.vmap(epoch, in_axes=(0, None, None, 0))
  return jax.jit(epoch, donate_argnums=0), num_steps


# ----------------------------------------------------------------------------
# Checkpoints.
# ----------------------------------------------------------------------------


def _manager(path: str) -> ocp.CheckpointManager:
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


def restore(manager: ocp.CheckpointManager, target: TrainState,
            step: int | None = None) -> TrainState:
  """Restores into the structure of `target`; a clear error on a mismatch."""
  step = manager.latest_step() if step is None else step
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
        f"The checkpoint in {manager.directory} (step {step}) does not match "
        "this model/config (different model, hidden size, max_len or data "
        "set?). Use a fresh --workdir or the config that wrote it. "
        f"Orbax said: {str(e)[:500]}") from None


# ----------------------------------------------------------------------------
# One phase.
# ----------------------------------------------------------------------------


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
    self.latest = [_manager(os.path.join(p, "latest")) for p in self.pdirs]
    self.best = [_manager(os.path.join(p, "best")) for p in self.pdirs]
    self.best_info = [{"epoch": -1, select: -np.inf} for _ in self.pdirs]

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

  def close(self):
    for m in self.latest + self.best:
      m.wait_until_finished()
      m.close()


def _train_epochs(runs: _Runs, state, start, epochs, epoch_fn, pert, data,
                  validate, config):
  """The epoch loop of `run_phase`; returns the final state."""
  phase, select = runs.phase, runs.select
  eval_every = phase_eval_every(config, phase)
  t_phase = time.time()
  for epoch in range(start + 1, epochs + 1):
    t0 = time.time()
    step0 = int(np.ravel(jax.device_get(state.step))[0])
    state, terms = epoch_fn(state, data, pert, runs.epoch_key(epoch))
    terms = runs.split(jax.device_get(terms))  # the one host sync
    for r, t in enumerate(terms):
      _check_finite(t, step0, phase, runs.where(r))
    dt = time.time() - t0
    n_steps = len(terms[0]["loss"]) * len(runs)
    means = [{k: float(np.mean(v)) for k, v in t.items()} for t in terms]
    if epoch % config.train.log_every == 0 or epoch == epochs:
      elapsed = time.time() - t_phase
      eta = elapsed / (epoch - start) * (epochs - epoch)
      avg = {k: np.mean([m[k] for m in means]) for k in means[0]}
      logging.info(
          "[%s] epoch %d/%d loss %.4f (bce %.4f adv1 %.4f adv2 %.4f%s) "
          "%.1f steps/s, %.2f s/epoch, ETA %.0f s", phase, epoch, epochs,
          avg["loss"], avg["bce"], avg["adv1"], avg["adv2"],
          f"; mean of {len(runs)} runs" if runs.stacked else "",
          n_steps / dt, dt, eta)
    if epoch % eval_every == 0 or epoch == epochs:
      t_eval = time.time()
      vals = validate(state.params)
      eval_s = time.time() - t_eval
      parts = runs.split(state)
      for r, val in enumerate(vals):
        runs.latest[r].save(epoch, args=ocp.args.StandardSave(parts[r]))
        if val[select] > runs.best_info[r][select]:
          runs.best[r].save(epoch, args=ocp.args.StandardSave(parts[r]),
                            force=True)
          runs.best[r].wait_until_finished()
          runs.best_info[r] = {"epoch": epoch, select: val[select]}
          if is_chief():
            with open(os.path.join(runs.pdirs[r], "best.json"), "w") as f:
              json.dump(runs.best_info[r], f)
        runs.writers[r].write(
            {"phase": phase, "epoch": epoch, "step": step0 + len(
                terms[r]["loss"]),
             **{f"train/{k}": v for k, v in means[r].items()},
             **{f"valid/{k}": v for k, v in val.items()},
             "steps_per_s": n_steps / dt, "epoch_s": dt, "eval_s": eval_s})
        logging.info("[%s] epoch %d valid%s %s", phase, epoch, runs.where(r),
                     " ".join(f"{k}={v:.4f}" for k, v in val.items()))
  return state


def phase_eval_every(config, phase: str) -> int:
  """Validation interval (epochs) of `phase`: adv.eval_every in phase 2."""
  if phase != "pretrain" and config.adv.eval_every:
    return config.adv.eval_every
  return config.train.eval_every


def _resume(runs: _Runs, state):
  """(state, start epoch) from the runs' latest checkpoints, if any."""
  steps = [m.latest_step() for m in runs.latest]
  if all(s is None for s in steps):
    return state, 0
  if len(set(steps)) > 1:
    raise ValueError(
        f"[{runs.phase}] the runs in {runs.pdirs} were saved at different "
        f"epochs ({steps}); resume them one at a time with launch.py.")
  state = runs.join([restore(m, runs.take(state, r))
                     for r, m in enumerate(runs.latest)])
  for r, p in enumerate(runs.pdirs):
    if os.path.exists(os.path.join(p, "best.json")):
      with open(os.path.join(p, "best.json")) as f:
        runs.best_info[r] = json.load(f)
    logging.info("[%s] resumed%s from epoch %d (best %s %.4f at epoch %d)",
                 runs.phase, runs.where(r), steps[r], runs.select,
                 runs.best_info[r][runs.select], runs.best_info[r]["epoch"])
  return state, int(steps[0])


def run_phase(phase: str, state: TrainState, epochs: int, epoch_fn, pert,
              data: dict, ranker, config, workdirs, writers, root_keys,
              stacked: bool = False):
  """Trains `epochs` epochs (resuming), selects on validation, tests once.

  `workdirs`, `writers` and `root_keys` hold one entry per run. With one run
  and `stacked=False`, `state` has no run axis; with `stacked=True` it has a
  leading run axis R (an `epoch_fn` and `ranker` built with `runs=True`).
  Each run is selected and tested on its own.

  Returns (final state, [results dict of this phase, one per run]).
  """
  select = config.eval.select
  runs = _Runs(phase, workdirs, writers, root_keys, stacked, select)
  results_paths = [os.path.join(p, "results.json") for p in runs.pdirs]
  try:
    state, start = _resume(runs, state)
    if start >= epochs and all(map(os.path.exists, results_paths)):
      out = []
      for path in results_paths:
        with open(path) as f:
          out.append(json.load(f))
      return state, out

    def validate(params):
      r = np.asarray(ranker(params, *evaluate.split_inputs(data, "valid"),
                            data["history"]))
      return [evaluate.summarize(x, config.eval.ks)
              for x in (r if stacked else [r])]

    t_phase = time.time()
    try:
      state = _train_epochs(runs, state, start, epochs, epoch_fn, pert, data,
                            validate, config)
    finally:
      # Saves are asynchronous: finish them even when training stops early
      # (a NaN, Ctrl-C), so that the last good checkpoint is complete on disk.
      for m in runs.latest + runs.best:
        m.wait_until_finished()

    # The test split is read here, once, for each run's selected checkpoint.
    for r, info in enumerate(runs.best_info):
      if info["epoch"] < 0:
        raise RuntimeError(f"[{phase}]{runs.where(r)} no evaluation was run; "
                           "nothing to test.")
    selected = runs.join([
        restore(runs.best[r], runs.take(state, r), step=info["epoch"])
        for r, info in enumerate(runs.best_info)])
    ranks = np.asarray(ranker(selected.params,
                              *evaluate.split_inputs(data, "test"),
                              data["history"]))
    out = []
    for r, x in enumerate(ranks if stacked else [ranks]):
      test = evaluate.summarize(x, config.eval.ks)
      info = runs.best_info[r]
      results = {"phase": phase, "selected_epoch": info["epoch"],
                 f"valid/{select}": info[select],
                 **{f"test/{k}": v for k, v in test.items()},
                 "train_s": time.time() - t_phase}
      runs.writers[r].write({"phase": phase, "epoch": info["epoch"],
                             "split": "test",
                             **{f"test/{k}": v for k, v in test.items()}})
      if is_chief():
        with open(results_paths[r], "w") as f:
          json.dump(results, f, indent=1)
      logging.info("[%s]%s selected epoch %d; test %s", phase, runs.where(r),
                   info["epoch"],
                   " ".join(f"{k}={v:.4f}" for k, v in test.items()))
      out.append(results)
    return state, out
  finally:
    runs.close()


# ----------------------------------------------------------------------------
# Entry point.
# ----------------------------------------------------------------------------


def adv_config(config) -> adversarial.AdvConfig:
  a = config.adv
  return adversarial.method_config(a.method, a.eps, a.lambda1, a.lambda2,
                                   a.xi, a.scope, a.relative)


MATMUL_PRECISIONS = ("default", "float32", "tensorfloat32", "bfloat16")


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


def _pretrain_signature(config) -> dict:
  """The config fields that define the phase-1 model.

  Leaves out what may change between a run and its resumption or reuse: the
  number of epochs, logging and evaluation settings, and phase 2 (`adv`).
  """
  d = config.to_dict()
  for key in ("adv", "eval", "parallel"):
    d.pop(key)
  for key in ("epochs", "eval_every", "log_every", "pretrain_dir"):
    d["train"].pop(key)
  # Precision knobs at their defaults are left out, so that workdirs written
  # before these knobs existed stay valid.
  if d["model"].get("dtype") == "float32":
    d["model"].pop("dtype")
  if d["train"].get("matmul_precision") == "default":
    d["train"].pop("matmul_precision")
  return json.loads(json.dumps(d, default=str))


def _update_json(path: str, key: str, value: dict):
  if not is_chief():
    return
  content = {}
  if os.path.exists(path):
    with open(path) as f:
      content = json.load(f)
  content[key] = value
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(content, f, indent=1)
  os.replace(tmp, path)


def _best_epoch(workdir: str, phase: str) -> int:
  """The selected epoch of a finished phase; a clear error if there is none."""
  best_path = os.path.join(workdir, phase, "best.json")
  if not os.path.exists(best_path):
    raise FileNotFoundError(
        f"{best_path} not found: train phase {phase!r} in {workdir} first.")
  with open(best_path) as f:
    return json.load(f)["epoch"]


def selected_params(config, workdir: str, phase: str, num_items: int):
  """(model, params) of a phase's selected (best-on-validation) checkpoint.

  Needs no data file: the model is rebuilt from `config` (the run's
  resolved config.json) and `num_items` (N), and `<workdir>/<phase>/best` is
  restored.
  """
  epoch = _best_epoch(workdir, phase)
  T = config.data.max_len
  model = models.build_model(config.model, num_items, T)
  template = init_state(model, make_optimizer(config.train),
                        jax.random.PRNGKey(0), T)
  manager = _manager(os.path.join(workdir, phase, "best"))
  try:
    state = restore(manager, template, step=epoch)
  finally:
    manager.close()
  return model, state.params


def load_selected(config, workdir: str, phase: str):
  """(model, params, data, num_items) of a phase's selected checkpoint.

  For analyses after training (robustness, figures): rebuilds the data and
  model from `config` and restores `<workdir>/<phase>/best`.
  """
  _best_epoch(workdir, phase)  # fail before reading the data
  arrays = data_lib.build_arrays(data_lib.load_from_config(config.data),
                                 config.data.max_len)
  model, params = selected_params(config, workdir, phase, arrays.num_items)
  return model, params, device_data(arrays), arrays.num_items


def _check_pretrain(config, pre_dir: str, reuse: bool):
  """Guards a shared phase 1: `pre_dir` must hold this config's pretraining.

  Writes the signature on first use; `reuse=True` (train.pretrain_dir was
  given) requires it to exist already.
  """
  sig_path = os.path.join(pre_dir, "pretrain", "signature.json")
  signature = _pretrain_signature(config)
  if os.path.exists(sig_path):
    with open(sig_path) as f:
      if json.load(f) != signature:
        raise ValueError(
            f"{os.path.join(pre_dir, 'pretrain')} was pretrained with another "
            "data/model/train config; use another workdir (or "
            "train.pretrain_dir) for this one.")
  elif reuse:
    raise FileNotFoundError(
        f"train.pretrain_dir={pre_dir!r} holds no pretrain/ phase; run phase "
        "1 there first.")
  elif is_chief():
    os.makedirs(os.path.dirname(sig_path), exist_ok=True)
    with open(sig_path, "w") as f:
      json.dump(signature, f, indent=1)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict:
  """Runs phase 1 and (if adv.epochs > 0) phase 2; returns results.json."""
  pre = config.train.pretrain_dir
  return train_runs(config, [workdir], [config.seed],
                    [pre] if pre else None)[0]


def train_runs(config: ml_collections.ConfigDict, workdirs, seeds,
               pretrain_dirs=None) -> list:
  """Trains one run per seed, all in one vectorized program (`jax.vmap`).

  Each run gives what `train_and_evaluate` gives for that seed alone (same
  keys, data order, negatives, selection; equal up to float reordering) and
  writes the same files under its own workdir, so runs can be resumed, or
  analysed, one at a time. `config.seed` and `config.train.pretrain_dir` are
  replaced by `seeds` and `pretrain_dirs` (None: each workdir pretrains).
  A single run is trained without the run axis.

  Returns:
    One results dict (as in results.json) per run.
  """
  validate_config(config)
  with matmul_precision(config):
    return _train_runs(config, workdirs, seeds, pretrain_dirs)


def _train_runs(config, workdirs, seeds, pretrain_dirs) -> list:
  if len(workdirs) != len(seeds) or len(set(map(os.path.abspath,
                                                workdirs))) != len(workdirs):
    raise ValueError(f"Need one distinct workdir per seed; got {workdirs} "
                     f"for seeds {list(seeds)}.")
  stacked = len(seeds) > 1
  reuse = pretrain_dirs is not None
  pre_dirs = list(pretrain_dirs) if reuse else list(workdirs)
  for w in workdirs:
    os.makedirs(w, exist_ok=True)
  writers = [JsonlWriter(os.path.join(w, "metrics.jsonl")) for w in workdirs]

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
  N, T = ds.num_items, config.data.max_len
  for w, seed, pre in zip(workdirs, seeds, pre_dirs):
    c = config.copy_and_resolve_references()
    c.seed = seed
    c.train.pretrain_dir = pre if reuse else ""
    if is_chief():
      with open(os.path.join(w, "config.json"), "w") as f:
        f.write(c.to_json_best_effort(indent=1))
    _check_pretrain(c, pre, reuse)

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
                                          config.eval.shard_items)
  else:
    ranker = evaluate.make_ranker(evaluate.model_scores(model), N,
                                  config.eval.batch_size, mesh, runs=stacked)
  num_train_users = int(data["train_users"].shape[0])
  if num_train_users == 0:
    raise data_lib.DataError("No user has two training items to learn from.")
  popularity = evaluate.evaluate_popularity(data, N, config.eval.batch_size,
                                            config.eval.ks, mesh=mesh)
  results = [{"data": stats, "popularity/valid": popularity} for _ in seeds]
  def phase(state, name, epochs, objective, pert, out_dirs, phase_keys):
    epoch_fn, _ = make_train_epoch(objective, optimizer, N,
                                   config.train.batch_size, num_train_users,
                                   mesh, runs=stacked)
    return run_phase(name, state, epochs, epoch_fn, pert, data, ranker,
                     config, out_dirs, writers, phase_keys, stacked)

  # Phase 1: base model.
  uniform = (data["train_inputs"] > 0).astype(jnp.float32)
  logging.info("%d train users, %d steps/epoch, %d items, T=%d, %d devices, "
               "%d run(s)", num_train_users,
               -(-num_train_users // config.train.batch_size), N, T,
               mesh.size, len(seeds))
  if config.train.epochs > 0:
    state, res = phase(state, "pretrain", config.train.epochs,
                       adversarial.make_objective(
                           model, adversarial.method_config("none")),
                       uniform, pre_dirs, pre_keys)
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
    state, res = phase(state, method, config.adv.epochs,
                       adversarial.make_objective(model, adv_config(config)),
                       pert, workdirs, adv_keys)
    for w, r, x in zip(workdirs, results, res):
      r[method] = x
      _update_json(os.path.join(w, "results.json"), method, x)
  for w in workdirs:
    _update_json(os.path.join(w, "results.json"), "data", stats)
    _update_json(os.path.join(w, "results.json"), "popularity/valid",
                 popularity)
  for wr in writers:
    wr.close()
  return results
