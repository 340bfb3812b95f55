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
  has_target = (arrays.train_targets > 0).any(axis=1)
  d = {k: jnp.asarray(getattr(arrays, k)) for k in (
      "train_inputs", "train_targets", "history", "eval_users",
      "valid_inputs", "valid_targets", "test_inputs", "test_targets")}
  d["train_users"] = jnp.asarray(np.flatnonzero(has_target).astype(np.int32))
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
  return ocp.CheckpointManager(
      os.path.abspath(path),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))


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


def _check_finite(terms: dict, step0: int, phase: str):
  loss = np.asarray(terms["loss"])
  bad = np.flatnonzero(~np.isfinite(loss))
  if len(bad):
    i = int(bad[0])
    named = ", ".join(f"{k}={float(np.asarray(v)[i]):.4g}"
                      for k, v in sorted(terms.items()))
    raise NonFiniteLoss(
        f"Non-finite loss in phase {phase!r} at step {step0 + i + 1} "
        f"({named}). The last good checkpoint is kept; lower train.lr or "
        "adv.eps and restart.")


def _train_epochs(phase, state, start, epochs, epoch_fn, pert, data, validate,
                  config, writer, root_key, latest, best, best_path,
                  best_info):
  """The epoch loop of `run_phase`; returns (state, best_info)."""
  select = config.eval.select
  t_phase = time.time()
  for epoch in range(start + 1, epochs + 1):
    t0 = time.time()
    step0 = int(state.step)
    state, terms = epoch_fn(state, data, pert,
                            jax.random.fold_in(root_key, epoch))
    terms = jax.device_get(terms)  # the one host sync of the epoch
    _check_finite(terms, step0, phase)
    dt = time.time() - t0
    n_steps = len(terms["loss"])
    means = {k: float(np.mean(v)) for k, v in terms.items()}
    if epoch % config.train.log_every == 0 or epoch == epochs:
      elapsed = time.time() - t_phase
      eta = elapsed / (epoch - start) * (epochs - epoch)
      logging.info(
          "[%s] epoch %d/%d loss %.4f (bce %.4f adv1 %.4f adv2 %.4f) "
          "%.1f steps/s, %.2f s/epoch, ETA %.0f s", phase, epoch, epochs,
          means["loss"], means["bce"], means["adv1"], means["adv2"],
          n_steps / dt, dt, eta)
    if epoch % config.train.eval_every == 0 or epoch == epochs:
      t_eval = time.time()
      val = validate(state.params)
      eval_s = time.time() - t_eval
      improved = val[select] > best_info[select]
      latest.save(epoch, args=ocp.args.StandardSave(state))
      if improved:
        best.save(epoch, args=ocp.args.StandardSave(state), force=True)
        best.wait_until_finished()
        best_info = {"epoch": epoch, select: val[select]}
        if is_chief():
          with open(best_path, "w") as f:
            json.dump(best_info, f)
      writer.write({"phase": phase, "epoch": epoch, "step": int(state.step),
                    **{f"train/{k}": v for k, v in means.items()},
                    **{f"valid/{k}": v for k, v in val.items()},
                    "steps_per_s": n_steps / dt, "epoch_s": dt,
                    "eval_s": eval_s})
      logging.info("[%s] epoch %d valid %s", phase, epoch,
                   " ".join(f"{k}={v:.4f}" for k, v in val.items()))
  return state, best_info


def run_phase(phase: str, state: TrainState, epochs: int, epoch_fn, pert,
              data: dict, ranker, config, workdir: str, writer: JsonlWriter,
              root_key) -> tuple[TrainState, dict]:
  """Trains `epochs` epochs (resuming), selects on validation, tests once.

  Returns (final state, results dict of this phase).
  """
  pdir = os.path.join(workdir, phase)
  latest, best = _manager(os.path.join(pdir, "latest")), _manager(
      os.path.join(pdir, "best"))
  results_path = os.path.join(pdir, "results.json")
  best_path = os.path.join(pdir, "best.json")
  select = config.eval.select
  start = 0
  best_info = {"epoch": -1, select: -np.inf}
  if latest.latest_step() is not None:
    state = restore(latest, state)
    start = int(latest.latest_step())
    if os.path.exists(best_path):
      with open(best_path) as f:
        best_info = json.load(f)
    logging.info("[%s] resumed from epoch %d (best %s %.4f at epoch %d)",
                 phase, start, select, best_info[select], best_info["epoch"])
  if start >= epochs and os.path.exists(results_path):
    latest.close()
    best.close()
    with open(results_path) as f:
      return state, json.load(f)

  def validate(params):
    r = ranker(params, *evaluate.split_inputs(data, "valid"),
               data["history"])
    return evaluate.summarize(np.asarray(r), config.eval.ks)

  t_phase = time.time()
  try:
    state, best_info = _train_epochs(
        phase, state, start, epochs, epoch_fn, pert, data, validate, config,
        writer, root_key, latest, best, best_path, best_info)
  finally:
    # Saves are asynchronous: finish them even when training stops early
    # (a NaN, Ctrl-C), so that the last good checkpoint is complete on disk.
    latest.wait_until_finished()
    best.wait_until_finished()

  # The test split is read here, once, for the selected checkpoint.
  if best_info["epoch"] < 0:
    raise RuntimeError(f"[{phase}] no evaluation was run; nothing to test.")
  selected = restore(best, state, step=best_info["epoch"])
  r = ranker(selected.params, *evaluate.split_inputs(data, "test"),
             data["history"])
  test = evaluate.summarize(np.asarray(r), config.eval.ks)
  results = {"phase": phase, "selected_epoch": best_info["epoch"],
             f"valid/{select}": best_info[select],
             **{f"test/{k}": v for k, v in test.items()},
             "train_s": time.time() - t_phase}
  writer.write({"phase": phase, "epoch": best_info["epoch"], "split": "test",
                **{f"test/{k}": v for k, v in test.items()}})
  if is_chief():
    with open(results_path, "w") as f:
      json.dump(results, f, indent=1)
  logging.info("[%s] selected epoch %d; test %s", phase, best_info["epoch"],
               " ".join(f"{k}={v:.4f}" for k, v in test.items()))
  latest.close()
  best.close()
  return state, results


# ----------------------------------------------------------------------------
# Entry point.
# ----------------------------------------------------------------------------


def adv_config(config) -> adversarial.AdvConfig:
  a = config.adv
  return adversarial.method_config(a.method, a.eps, a.lambda1, a.lambda2,
                                   a.xi, a.scope)


def validate_config(config):
  """Fails fast, before any data is read, on values that cannot work."""
  if config.model.name not in models.MODELS:
    raise ValueError(f"Unknown model.name {config.model.name!r}; choose one "
                     f"of {models.MODELS}.")
  adv_config(config)
  for name in ("epochs", "batch_size", "eval_every", "log_every"):
    if config.train[name] < (0 if name == "epochs" else 1):
      raise ValueError(f"train.{name} must be positive, got "
                       f"{config.train[name]}.")
  if config.adv.epochs < 0:
    raise ValueError(f"adv.epochs must be >= 0, got {config.adv.epochs}.")
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


def load_selected(config, workdir: str, phase: str):
  """(model, params, data, num_items) of a phase's selected checkpoint.

  For analyses after training (robustness, figures): rebuilds the data and
  model from `config` and restores `<workdir>/<phase>/best`.
  """
  best_path = os.path.join(workdir, phase, "best.json")
  if not os.path.exists(best_path):
    raise FileNotFoundError(
        f"{best_path} not found: train phase {phase!r} in {workdir} first.")
  with open(best_path) as f:
    epoch = json.load(f)["epoch"]
  arrays = data_lib.build_arrays(data_lib.load_from_config(config.data),
                                 config.data.max_len)
  model = models.build_model(config.model, arrays.num_items, arrays.max_len)
  template = init_state(model, make_optimizer(config.train),
                        jax.random.PRNGKey(0), arrays.max_len)
  manager = _manager(os.path.join(workdir, phase, "best"))
  state = restore(manager, template, step=epoch)
  manager.close()
  return model, state.params, device_data(arrays), arrays.num_items


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict:
  """Runs phase 1 and (if adv.epochs > 0) phase 2; returns results.json."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  writer = JsonlWriter(os.path.join(workdir, "metrics.jsonl"))

  t0 = time.time()
  ds = data_lib.load_from_config(config.data)
  arrays = data_lib.build_arrays(ds, config.data.max_len)
  stats = data_lib.describe(ds)
  logging.info("data: %s (%.1f s)", stats, time.time() - t0)
  mesh = sharding.make_mesh(config.parallel.devices)
  data = sharding.replicate(device_data(arrays), mesh)
  N, T = arrays.num_items, arrays.max_len
  if is_chief():
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))

  model = models.build_model(config.model, N, T)
  optimizer = make_optimizer(config.train)
  root = jax.random.PRNGKey(config.seed)
  init_key, pre_key, adv_key = jax.random.split(root, 3)
  state = sharding.replicate(init_state(model, optimizer, init_key, T), mesh)
  if config.eval.item_chunk:
    ranker = evaluate.make_chunked_ranker(model, N, config.eval.batch_size,
                                          config.eval.item_chunk, mesh)
  else:
    ranker = evaluate.make_ranker(evaluate.model_scores(model), N,
                                  config.eval.batch_size, mesh)
  num_train_users = int(data["train_users"].shape[0])
  if num_train_users == 0:
    raise data_lib.DataError("No user has two training items to learn from.")
  results = {"data": stats,
             "popularity/valid": evaluate.evaluate_popularity(
                 data, N, config.eval.batch_size, config.eval.ks)}

  # Phase 1: base model.
  pre_dir = config.train.pretrain_dir or workdir
  sig_path = os.path.join(pre_dir, "pretrain", "signature.json")
  signature = _pretrain_signature(config)
  if os.path.exists(sig_path):
    with open(sig_path) as f:
      if json.load(f) != signature:
        raise ValueError(
            f"{os.path.join(pre_dir, 'pretrain')} was pretrained with another "
            "data/model/train config; use another workdir (or "
            "train.pretrain_dir) for this one.")
  elif config.train.pretrain_dir:
    raise FileNotFoundError(
        f"train.pretrain_dir={config.train.pretrain_dir!r} holds no "
        "pretrain/ phase; run phase 1 there first.")
  elif is_chief():
    os.makedirs(os.path.dirname(sig_path), exist_ok=True)
    with open(sig_path, "w") as f:
      json.dump(signature, f, indent=1)

  base_cfg = adversarial.method_config("none")
  epoch_fn, steps = make_train_epoch(
      adversarial.make_objective(model, base_cfg), optimizer, N,
      config.train.batch_size, num_train_users, mesh)
  uniform = (data["train_inputs"] > 0).astype(jnp.float32)
  logging.info("%d train users, %d steps/epoch, %d items, T=%d, %d devices",
               num_train_users, steps, N, T, mesh.size)
  if config.train.epochs > 0:
    state, results["pretrain"] = run_phase(
        "pretrain", state, config.train.epochs, epoch_fn, uniform, data,
        ranker, config, pre_dir, writer, pre_key)
    _update_json(os.path.join(workdir, "results.json"), "pretrain",
                 results["pretrain"])

  # Phase 2: adversarial method from the phase-1 state.
  if config.adv.epochs > 0:
    method = config.adv.method
    acfg = adv_config(config)
    t_c = time.time()
    pert = cascade.weights_for_method(data["train_inputs"],
                                      config.train.batch_size, method)
    logging.info("level-1 weights for %s in %.2f s", method, time.time() - t_c)
    adv_fn, _ = make_train_epoch(adversarial.make_objective(model, acfg),
                                 optimizer, N, config.train.batch_size,
                                 num_train_users, mesh)
    state, results[method] = run_phase(
        method, state, config.adv.epochs, adv_fn, pert, data, ranker, config,
        workdir, writer, adv_key)
    _update_json(os.path.join(workdir, "results.json"), method,
                 results[method])
  _update_json(os.path.join(workdir, "results.json"), "data", stats)
  _update_json(os.path.join(workdir, "results.json"), "popularity/valid",
               results["popularity/valid"])
  writer.close()
  return results
