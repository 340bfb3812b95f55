"""The training state and the jitted epoch: one `lax.scan` of train steps.

`TrainState` is what changes during training (a pytree, donated to the
epoch); `make_train_epoch` builds an epoch from an objective
(`adversarial.make_objective`), an optimizer and a plan: length buckets
(`batching.TrainPlan`) or packed rows (`packing.PackedPlan`, one shape).
What is compiled (`epoch_program`) depends only on
shapes and the method's structure, so one program serves every eps and
level-1 weight table (`compilation`).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from absl import logging

from cat_jax import batching, compilation, packing, sampling, sharding


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree, donated to the step."""
  step: jax.Array
  params: Any
  opt_state: Any


def make_optimizer(tcfg) -> optax.GradientTransformation:
  """Adam with coupled L2 (torch `Adam(weight_decay=l2)`), Sec. 5.3 settings."""
  return optax.chain(optax.add_decayed_weights(tcfg.l2),
                     optax.adam(tcfg.lr, b1=tcfg.b1, b2=tcfg.b2))


def init_program(model, optimizer, max_len: int, runs: bool = False):
  """The jitted `init(rng) -> TrainState` (step 0); with `runs=True`, rng is
  [R, 2] and the states are stacked over a leading run axis."""
  def init(rng):
    params = model.init(rng, jnp.ones((1, max_len), jnp.int32))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))
  # One compiled program: op by op, Flax's init runs ~3 s on a CPU.
  return jax.jit(jax.vmap(init) if runs else init)


def init_state(model, optimizer, rng, max_len: int) -> TrainState:
  """A fresh TrainState (step 0) from `rng`."""
  return init_program(model, optimizer, max_len)(rng)


def init_states(model, optimizer, keys, max_len: int) -> TrainState:
  """Independent TrainStates stacked over a leading run axis, one per key."""
  return init_program(model, optimizer, max_len, runs=True)(keys)


def make_train_epoch(objective, optimizer, num_items: int,
                     plan: batching.TrainPlan, mesh=None, runs: bool = False,
                     hparams: dict | None = None, program=None):
  """(`epoch(state, data, pert, key, order_key) -> (state, terms)`, steps).

  One epoch is a `lax.scan` over the plan's steps with nothing crossing to
  the host: users are shuffled on device (`batching.epoch_order`), a batch
  of length bucket b runs on the last T_b columns of its windows (a
  `lax.switch` over the buckets, all compiled into one program), the
  fill of each bucket's last batch gets weight 0, and negatives are sampled
  on device. `pert` is the [U, T] level-1 weight table. `terms` holds each
  loss term per step ([steps] arrays). With a `mesh`, each batch is split
  across its devices (data parallel) and everything else is replicated.

  `key` is the run's key (users, negatives, dropout, perturbations);
  `order_key` orders the buckets' batches and is shared by all runs.

  What is compiled (`epoch_program`) depends on shapes and on the method's
  structure only: the plan's arrays, the weight table, the keys and
  `hparams` ({'eps', 'lambda1', 'lambda2', 'xi'}, see
  `adversarial.AdvConfig.hyperparams`; passed on to `objective`) are
  runtime inputs. So an eps sweep, or `global` and the cascade methods,
  reuse one program: pass the `program` of an earlier call with the same
  objective structure and plan shape (the persistent compilation cache
  also finds it across processes). Without `hparams` the objective's own
  values are compiled in.

  With `runs=True` the epoch trains several independent runs at once: `state`
  is stacked over a leading run axis (see `init_states`) and `key` is [R, 2];
  each run keeps its own data order, negatives and dropout, and `terms` are
  [R, steps]. One small model leaves an accelerator mostly idle, so seeds
  share one program this way.
  """
  if program is None:
    program = epoch_program(objective, optimizer, num_items, plan, mesh, runs)
  order = plan_arrays(plan)
  if mesh is not None:
    order = sharding.replicate(order, mesh)
  hp = {k: jnp.asarray(v, jnp.float32) for k, v in (hparams or {}).items()}

  def epoch(state, data, pert, key, order_key):
    return program(state, data, pert, hp, order, key, order_key)

  epoch.program = program
  epoch.lower = lambda state, data, pert, key, order_key: program.lower(
      state, data, pert, hp, order, key, order_key)
  epoch.ahead = lambda state, data, pert, key, order_key: Ahead(
      program, state, data, pert, hp, order, key, order_key)
  return epoch, plan.num_steps


def train_step(state: TrainState, loss_fn, optimizer, batch, rng, hparams):
  """One optimizer step on `loss_fn(params, batch, rng, hparams) -> (loss,
  terms)`: (the next TrainState, terms)."""
  grads, terms = jax.grad(loss_fn, has_aux=True)(state.params, batch, rng,
                                                 hparams)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return TrainState(state.step + 1, params, opt_state), terms


def plan_arrays(plan) -> dict:
  """The `order` input of an epoch program: a plan's arrays on the device
  (`batching.order_arrays` or `packing.order_arrays`)."""
  if isinstance(plan, packing.PackedPlan):
    return packing.order_arrays(plan)
  return batching.order_arrays(plan)


def epoch_program(objective, optimizer, num_items: int,
                  plan: batching.TrainPlan, mesh=None, runs: bool = False):
  """The jitted `epoch(state, data, pert, hparams, order, key, order_key)`.

  Depends on the plan only through its shape (bucket lengths, users, steps,
  batch size, mean length); `order` holds its arrays (`plan_arrays`). See
  `make_train_epoch`. A `packing.PackedPlan` gets `_packed_program`.

  Loss scale: the objective is a mean over the batch's real positions (the
  SASRec convention). Bucketed batches hold users of similar length, so
  that mean would give each position of a short-history user several times
  the weight it has in a mixed batch (on Video SASRec, 60 epochs, seed 0,
  4 buckets trained that way to test NDCG@10 0.0447 against 0.0494
  unbucketed; RESULTS.md). With more than one bucket the objective
  is therefore scaled by (real positions of the batch) / (B x mean window
  length): a sum over positions divided by what an average batch holds, so
  every position weighs what it weighs in unbucketed training.
  """
  if isinstance(plan, packing.PackedPlan):
    return _packed_program(objective, optimizer, num_items, plan, mesh, runs)
  sharding.check_divisible(plan.batch_size, mesh, "train.batch_size")
  norm = plan.batch_size * plan.mean_length if len(plan.lengths) > 1 else None
  num_steps, lengths = plan.num_steps, plan.lengths

  loss_fn = _scaled_loss(objective, norm)

  def epoch(state, data, pert, hparams, order, key, order_key):
    perm_key, step_key = jax.random.split(key)
    buckets, idx, real = batching.epoch_order(plan, perm_key, order_key,
                                              order)
    keys = jax.random.split(step_key, num_steps)
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
        return train_step(state, loss_fn, optimizer, batch, obj_key, hparams)
      return step

    branches = [at_length(t) for t in lengths]

    def step(state, xs):
      b, u, real_user, k = xs
      u = sharding.shard_rows(u, mesh)
      if len(branches) == 1:
        return branches[0](state, u, real_user, k)
      return jax.lax.switch(b, branches, state, u, real_user, k)

    return jax.lax.scan(step, state, (buckets, idx, real, keys))

  return _compile(epoch, runs)


def _scaled_loss(objective, norm: float | None):
  """loss_fn(params, batch, rng, hparams) -> (loss, terms): the objective,
  times (real positions of the batch) / `norm` unless `norm` is None."""
  def loss_fn(params, batch, rng, hparams):
    # Objectives without runtime hyperparameters take three arguments.
    loss, terms = (objective(params, batch, rng, hparams) if hparams
                   else objective(params, batch, rng))
    if norm is None:
      return loss, terms
    return loss * (jnp.sum(batch["weights"]) / norm), terms
  return loss_fn


def _compile(epoch, runs: bool):
  """The jitted epoch (state donated); with `runs`, vmapped over the state
  and the run key."""
  if runs:
    epoch = jax.vmap(epoch, in_axes=(0, None, None, None, None, 0, None))
  return jax.jit(epoch, donate_argnums=0,
                 compiler_options=compilation.compiler_options())


def _packed_program(objective, optimizer, num_items: int,
                    plan: packing.PackedPlan, mesh=None, runs: bool = False):
  """`epoch_program` for a packed plan: one train step, one shape.

  Each step takes `plan.rows_per_batch` rows of T tokens (`packing`), so
  there is no `lax.switch` and no branch per length. Loss scale: the
  objective's mean over the batch's real positions is scaled by (real
  positions of the batch) / (real positions per step on average), so that
  every position weighs the same in every batch, as in `epoch_program`.
  `order_key` is not used: nothing has to agree across stacked runs, so each
  run orders its rows with its own key.
  """
  sharding.check_divisible(plan.rows_per_batch, mesh, "train.pack_rows")
  norm = plan.tokens_per_step

  loss_fn = _scaled_loss(objective, norm)

  def epoch(state, data, pert, hparams, order, key, order_key):
    del order_key
    perm_key, step_key = jax.random.split(key)
    rows, slot_user = packing.epoch_order(plan, perm_key, order)
    keys = jax.random.split(step_key, plan.num_steps)

    def step(state, xs):
      r, k = xs
      r = sharding.shard_rows(r, mesh)
      neg_key, obj_key = jax.random.split(k)
      t = packing.batch_rows(order, r, slot_user,
                             {"inputs": data["train_inputs"],
                              "targets": data["train_targets"],
                              "pert": pert})
      batch = {
          "inputs": t["inputs"], "targets": t["targets"],
          "negatives": sampling.sample_negatives_at(
              neg_key, data["history"], t["users"], num_items),
          "weights": (t["targets"] > 0).astype(jnp.float32),
          "pert": t["pert"], "segments": t["segments"],
          "positions": t["positions"],
      }
      return train_step(state, loss_fn, optimizer, batch, obj_key, hparams)

    return jax.lax.scan(step, state, (rows, keys))

  return _compile(epoch, runs)


def _abstract(tree):
  """ShapeDtypeStructs (with shardings) of a pytree of arrays. Uncommitted
  arrays (fresh PRNG keys) get no sharding, as jit lowers them on a call:
  the program is then the one a direct call compiles (same persistent
  cache key; with their sharding it compiled again)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=x.sharding if getattr(x, "committed", False)
      else None), tree)


class Ahead:
  """An epoch program compiled on a background thread, ahead of its use.

  `Ahead(program, *args)` lowers and compiles `program` (an `epoch_program`)
  for the shapes of `args` (state, data, pert, hparams, order, key,
  order_key) on a daemon thread, so that on a machine with a free core the
  next phase's program compiles while this phase trains. Calling it waits
  for the executable and runs it; if compiling failed, or the arguments do
  not match what was compiled, the jitted `program` runs instead (and
  compiles as usual). Shapes are taken at once, so the arrays may be
  donated while the thread works.
  """

  def __init__(self, program, *args):
    import threading
    self.program = program
    self._abstract = _abstract(args)
    self._compiled = None
    self._error = None
    self._thread = threading.Thread(target=self._compile, daemon=True)
    self._thread.start()

  def _compile(self):
    try:
      self._compiled = self.program.lower(*self._abstract).compile()
    except Exception as e:  # noqa: BLE001 (the jitted program still works)
      self._error = e

  def ready(self) -> bool:
    return not self._thread.is_alive()

  def wait(self):
    """Blocks until the background compilation has ended (either way)."""
    self._thread.join()

  def _cache_size(self) -> int:
    """As jax's: 1 once an executable is there (no compile on the call)."""
    self.wait()
    return 1 if self._compiled is not None else self.program._cache_size()  # noqa: SLF001

  def lower(self, *args):
    return self.program.lower(*args)

  def __call__(self, *args):
    self.wait()
    if self._compiled is not None:
      try:
        return self._compiled(*args)
      except (TypeError, ValueError) as e:  # other shapes or shardings
        logging.info("the training program compiled ahead does not fit "
                     "(%s); compiling it again", str(e).splitlines()[0])
        self._compiled = None
    elif self._error is not None:
      logging.info("compiling the training program ahead failed (%s); "
                   "compiling it now", str(self._error).splitlines()[0])
      self._error = None
    return self.program(*args)
