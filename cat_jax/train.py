"""Training: the two-phase schedule, from a config to results.json.

Phase 1 ('pretrain') trains the base model with BCE (Eq. 3.5) for
`train.epochs`; phase 2 trains `adv.method` from the phase-1 state for
`adv.epochs` (Tan et al., Sec. 5.3: 500 + 100 epochs). Each phase
(`phase.run_phase`) keeps its own Orbax checkpoints (latest and
best-on-validation) under `workdir/<phase>/`, so a killed run restarts from
its latest checkpoint and several phase-2 methods in one workdir pretrain
once; `epoch` holds the state and the jitted epoch, `workdir` the workdir
contract, `batching` how users become batches.

Model selection uses validation NDCG@10 only; the test split is read once per
phase, for the selected checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from cat_jax import adversarial, batching, cascade, checkpoints, compilation
from cat_jax import data as data_lib
from cat_jax import evaluate, models, packing, poisoning
from cat_jax import programs as programs_lib
from cat_jax import sharding
from cat_jax import workdir_lock
from cat_jax.epoch import (  # noqa: F401 (also importable from here)
    Ahead, TrainState, epoch_program, init_program, init_state, init_states,
    make_optimizer, make_train_epoch)
from cat_jax.phase import order_key, run_phase
from cat_jax.writer import JsonlWriter, is_chief

# The device tables moved to `batching`; these names stay for callers.
device_data = batching.device_data
sharded_device_data = batching.sharded_device_data


# ----------------------------------------------------------------------------
# Entry point.
# ----------------------------------------------------------------------------


def phase2_methods(config) -> list:
  """The phase-2 methods of `adv.method`, in order: 'cas' -> ['cas'],
  'none,global,cas' -> ['none', 'global', 'cas'] (each trained from the one
  phase 1, at the same adv settings). '+' separates them too, for config
  file arguments, where ',' separates the arguments: `default.py:
  method=none+cas`."""
  names = [m.strip() for m in re.split(r"[,+]", str(config.adv.method))]
  if not all(names):
    raise ValueError(f"adv.method={config.adv.method!r} has an empty entry; "
                     "write e.g. --config.adv.method=none,global,cas.")
  if len(set(names)) != len(names):
    raise ValueError(f"adv.method={config.adv.method!r} names a method "
                     "twice.")
  return names


def for_method(config, method: str):
  """A copy of `config` whose phase 2 is `method` alone."""
  c = config.copy_and_resolve_references()
  c.adv.method = method
  return c


def adv_config(config) -> adversarial.AdvConfig:
  """The AdvConfig of a config whose adv.method is one method."""
  a = config.adv
  return adversarial.method_config(a.method, a.eps, a.lambda1, a.lambda2,
                                   a.xi, a.scope, a.relative,
                                   direction=a.get("direction", "input"),
                                   budget=a.get("budget", "equal"),
                                   magnitude=a.get("magnitude", "uniform"))


MATMUL_PRECISIONS = ("default", "float32", "tensorfloat32", "bfloat16")
LAYOUTS = ("buckets", "packed")
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
  for method in phase2_methods(config):
    adv_config(for_method(config, method))
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
  if config.train.layout not in LAYOUTS:
    raise ValueError(f"Unknown train.layout {config.train.layout!r}; choose "
                     f"one of {LAYOUTS}.")
  if config.train.pack_rows < 0:
    raise ValueError("train.pack_rows must be >= 0 (0 = auto), got "
                     f"{config.train.pack_rows}.")
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
  arrays = data_lib.build_arrays(poisoning.load_from_config(config.data),
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
  (`checkpoints.check_workdir`) and the data have been checked. Each
  workdir is then locked for the rest of the run (`workdir_lock`): a second
  run into it stops with one line.

  Returns:
    One results dict (as in results.json) per run.
  """
  validate_config(config)
  compilation.setup_cache(config.get("compilation_cache", "auto"))
  with matmul_precision(config), workdir_lock.Held() as lock:
    return _train_runs(config, workdirs, seeds, pretrain_dirs, retrain, lock)


def make_plans(config, ds: data_lib.Dataset, data: dict, mesh_size: int = 1):
  """(training plan, evaluation plan or None).

  `train.layout` 'buckets': `train.buckets` / `train.bucket_lengths` bucket
  the training windows (`batching.TrainPlan`); 'packed': rows of several
  users (`packing.PackedPlan`, `train.pack_rows` rows a step, which must
  split evenly over `mesh_size` devices). `eval.buckets` buckets the
  evaluation windows (1 = off: every window at T).
  """
  T, B = config.data.max_len, config.train.batch_size
  users = data_lib.train_user_index(ds)
  if len(users) == 0:
    raise data_lib.DataError("No user has two training items to learn from.")
  lengths = batching.train_window_lengths(ds, users, T)
  if config.train.layout == "packed":
    plan = packing.packed_plan(users, lengths, T, B, config.train.pack_rows)
    if plan.rows_per_batch % mesh_size:
      raise ValueError(
          f"train.layout=packed splits each step's {plan.rows_per_batch} rows "
          f"over {mesh_size} devices: set train.pack_rows to a multiple of "
          f"{mesh_size}" + (" (0 chose that number: rows holding "
                            "train.batch_size users)."
                            if config.train.pack_rows == 0 else "."))
  else:
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


def _log_start(config, workdirs, ds, stats, data_s, mesh, plan, eval_plan):
  """The run's first lines: where it writes, on what, and its data."""
  devices = jax.devices()
  hosts = (f", process {jax.process_index() + 1} of {jax.process_count()}"
           if jax.process_count() > 1 else "")
  logging.info("workdir %s; JAX %s, %d %s device(s)%s", ", ".join(workdirs),
               jax.__version__, len(devices), devices[0].platform.upper(),
               hosts)
  logging.info("data %s: %s (%.1f s)",
               config.data.path or config.data.name,
               ", ".join(f"{k} {v}" for k, v in stats.items()), data_s)
  n_eval = len(data_lib.eval_user_index(ds))
  if n_eval < MIN_EVAL_USERS:
    logging.warning(
        "only %d users have a validation and a test item (fewer than %d): "
        "each one moves NDCG@10 by up to 1/%d, so the metrics of this run "
        "are mostly noise.", n_eval, MIN_EVAL_USERS, max(n_eval, 1))
  logging.info("%d train users, %d steps/epoch (%s), %d items, T=%d, "
               "%d device(s), %d run(s)", len(plan.users), plan.num_steps,
               plan.describe(), ds.num_items, config.data.max_len, mesh.size,
               len(workdirs))
  if eval_plan is not None:
    logging.info("evaluation buckets: %s", ", ".join(
        f"T={t}: {len(r)} users"
        for t, r in zip(eval_plan.lengths, eval_plan.rows)))


def _check_methods(config, workdir, pre_dir, reuse, retrain):
  """`checkpoints.check_workdir` for each phase-2 method of `config`, merged
  (the phases to delete of all of them)."""
  checks = [checkpoints.check_workdir(for_method(config, m), workdir, pre_dir,
                                      reuse, retrain)
            for m in phase2_methods(config)]
  delete = []
  for check in checks:
    delete += [d for d in check.delete if d not in delete]
  return checkpoints.PhaseCheck(
      delete=delete, pretrain_done=all(c.pretrain_done for c in checks))


def _train_runs(config, workdirs, seeds, pretrain_dirs, retrain,
                lock) -> list:
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
  # A workdir another run writes: one line at once, before the data.
  workdir_lock.check_free(workdirs)
  checks = [_check_methods(c, w, pre, reuse, retrain)
            for c, w, pre in zip(run_configs, workdirs, pre_dirs)]

  t0 = time.time()
  ds = poisoning.load_from_config(config.data)
  stats = data_lib.describe(ds)
  mesh = sharding.make_mesh(config.parallel.devices)
  if config.parallel.shard_data:
    data = sharded_device_data(ds, config.data.max_len, mesh)
  else:
    data = sharding.replicate(
        device_data(data_lib.build_arrays(ds, config.data.max_len)), mesh)
  plan, eval_plan = make_plans(config, ds, data, mesh.size)
  # One writer per workdir: lock them (a run that took one meanwhile stops
  # this one here), then check them again, as it may have changed them.
  lock.acquire(workdirs)
  checks = [_check_methods(c, w, pre, reuse, retrain)
            for c, w, pre in zip(run_configs, workdirs, pre_dirs)]

  # Everything is checked; from here on the run writes. The first lines come
  # only now, so that a mistake above prints its one line alone (launch.py).
  _log_start(config, workdirs, ds, stats, time.time() - t0, mesh, plan,
             eval_plan)
  for check, w, c in zip(checks, workdirs, run_configs):
    checkpoints.apply_deletions(check, [w])
    if is_chief():
      os.makedirs(w, exist_ok=True)
      checkpoints.write_json(os.path.join(w, "config.json"),
                             json.loads(c.to_json_best_effort()))
      checkpoints.write_item_ids(w, ds)
  writers = [JsonlWriter(os.path.join(w, "metrics.jsonl")) for w in workdirs]
  # The compiled programs: one epoch per method structure, the ranker and
  # the initializer; an earlier run of this process with the same setup
  # filled them already (`programs`).
  programs = programs_lib.for_setup(programs_lib.setup_key(
      config, len(seeds), ds.num_items, mesh, plan, eval_plan, data))
  try:
    with checkpoints.Preemption() as preemption:
      try:
        return _train_phases(config, run_configs, workdirs, pre_dirs, seeds,
                             stacked, ds, stats, data, mesh, plan, eval_plan,
                             writers, preemption, programs)
      finally:
        _wait_for_background(programs)
  finally:
    for wr in writers:
      wr.close()


def _wait_for_background(programs: dict):
  """Lets programs compiling ahead finish (a run stopped early by a signal or
  an error leaves them compiling): a process that exits while XLA compiles
  on another thread aborts (SIGABRT) instead of exiting with its code. The
  checkpoint of the stop is already written; this only costs the rest of
  that compilation."""
  for program in programs.values():
    if isinstance(program, Ahead) and not program.ready():
      logging.info("waiting for the training program compiling in the "
                   "background to finish before exiting")
      program.wait()


def _train_phases(config, run_configs, workdirs, pre_dirs, seeds, stacked,
                  ds, stats, data, mesh, plan, eval_plan, writers,
                  preemption, programs: dict) -> list:
  """Phase 1, then phase 2, for checked and prepared workdirs. `programs`
  (`programs.for_setup`: {structure: epoch program, "init": ..., "ranker":
  ...}) holds the compiled programs of earlier runs of the same setup and
  collects this run's."""
  N, T = ds.num_items, config.data.max_len
  model = models.build_model(config.model, N, T)
  optimizer = make_optimizer(config.train)
  keys = [jax.random.split(jax.random.PRNGKey(s), 3) for s in seeds]
  init_keys, pre_keys, adv_keys = ([k[i] for k in keys] for i in range(3))
  if "init" not in programs:
    programs["init"] = init_program(model, optimizer, T, runs=stacked)
  state = programs["init"](jnp.stack(init_keys) if stacked else init_keys[0])
  state = sharding.replicate(state, mesh)
  if config.eval.item_chunk:
    if stacked:
      raise ValueError("eval.item_chunk is not supported with several runs "
                       "in one program; train the seeds one at a time.")
    ranker = evaluate.make_chunked_ranker(model, N, config.eval.batch_size,
                                          config.eval.item_chunk, mesh,
                                          config.eval.shard_items,
                                          plan=eval_plan,
                                          program=programs.get("ranker"))
  else:
    ranker = evaluate.make_ranker(evaluate.model_scores(model), N,
                                  config.eval.batch_size, mesh, runs=stacked,
                                  plan=eval_plan,
                                  program=programs.get("ranker"))
  programs["ranker"] = ranker.program
  popularity = evaluate.evaluate_popularity(data, N, config.eval.batch_size,
                                            config.eval.ks, mesh=mesh)
  logging.info("popularity ranker (the baseline to beat): valid %s %.4f",
               config.eval.select, popularity[config.eval.select])
  results = [{"data": stats, "popularity/valid": popularity} for _ in seeds]

  def epoch_for(cfg):
    objective = adversarial.make_objective(model, cfg)
    key = cfg.structure()
    if key not in programs:
      programs[key] = epoch_program(objective, optimizer, N, plan, mesh,
                                    runs=stacked)
    return make_train_epoch(objective, optimizer, N, plan, mesh,
                            runs=stacked, hparams=cfg.hyperparams(),
                            program=programs[key])[0]

  def phase(state, name, epochs, cfg, pert, out_dirs, phase_keys):
    epoch_fn = epoch_for(cfg)
    program = programs[cfg.structure()]
    if isinstance(program, Ahead) and not program.ready():
      logging.info("[%s] waiting for its training program (compiling since "
                   "phase 1 started)", name)
    return run_phase(name, state, epochs, epoch_fn, pert, data, ranker,
                     config, out_dirs, writers, phase_keys, stacked,
                     preemption)

  uniform = (data["train_inputs"] > 0).astype(jnp.float32)
  methods = phase2_methods(config) if config.adv.epochs > 0 else []
  base = adversarial.method_config("none").structure()
  if config.train.epochs > 0:
    # Phase 2's programs compile on a background thread while phase 1
    # trains: on a machine with a free core, they are ready when it ends.
    example = (state, data, uniform,
               jnp.stack(adv_keys) if stacked else adv_keys[0],
               order_key(config, 1))
    for method in methods:
      cfg = adv_config(for_method(config, method))
      if cfg.structure() != base and cfg.structure() not in programs:
        logging.info("[%s] compiling its training program in the "
                     "background while phase 1 trains", method)
        programs[cfg.structure()] = epoch_for(cfg).ahead(*example)

  # Phase 1: base model.
  if config.train.epochs > 0:
    for c, pre in zip(run_configs, pre_dirs):
      pdir = os.path.join(pre, checkpoints.PRETRAIN)
      if not os.path.exists(os.path.join(pdir, "signature.json")):
        checkpoints.write_signature(c, pdir, checkpoints.PRETRAIN)
    state, best, res = phase(state, "pretrain", config.train.epochs,
                             adversarial.method_config("none"), uniform,
                             pre_dirs, pre_keys)
    if config.adv.init == "best":
      state = best
    for w, r, x in zip(workdirs, results, res):
      r["pretrain"] = x
      _update_json(os.path.join(w, "results.json"), "pretrain", x)

  # Phase 2: each adversarial method from the same phase-1 state (and the
  # same keys, so that each gives what it gives when trained alone).
  for i, method in enumerate(methods):
    mconfig = for_method(config, method)
    t_c = time.time()
    pert = cascade.weights_for_method(data["train_inputs"],
                                      config.train.batch_size, method,
                                      num_users=ds.num_users)
    if method in adversarial.CASCADE_METHODS:  # the others' are uniform
      logging.info("[%s] cascade weights (Eq. 4.11) in %.1f s", method,
                   time.time() - t_c)
    for c, w, pre in zip(run_configs, workdirs, pre_dirs):
      mdir = os.path.join(w, method)
      if not os.path.exists(os.path.join(mdir, "signature.json")):
        checkpoints.write_signature(
            for_method(c, method), mdir, method, checkpoints.phase1_end(
                os.path.join(pre, checkpoints.PRETRAIN), c.adv.init))
    # The epoch donates its state: every method but the last trains a copy.
    start = state if i == len(methods) - 1 else jax.tree.map(jnp.copy, state)
    _, _, res = phase(start, method, config.adv.epochs, adv_config(mconfig),
                      pert, workdirs, adv_keys)
    for w, r, x in zip(workdirs, results, res):
      r[method] = x
      _update_json(os.path.join(w, "results.json"), method, x)
  for w in workdirs:
    _update_json(os.path.join(w, "results.json"), "data", stats)
    _update_json(os.path.join(w, "results.json"), "popularity/valid",
                 popularity)
  return results
