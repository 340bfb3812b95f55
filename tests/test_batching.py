"""Length buckets: exact per-sequence results, epoch order, ranks, compiles."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cat_jax import adversarial, batching, data, evaluate, losses, models, train
from conftest import init_params


def _cost(lengths, bounds, batch_size):
  """Padded work of a bucketing, by a plain loop (the brute-force side)."""
  total = 0
  for t in bounds:
    lower = max([b for b in bounds if b < t], default=0)
    n = sum(1 for x in lengths if lower < x <= t)
    total += t * (-(-n // batch_size) * batch_size)
  return total


@pytest.mark.parametrize("seed", range(4))
def test_choose_buckets_is_optimal(seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 13, size=40)
  k, B = 3, 4
  got = batching.choose_buckets(lengths, k, B)
  assert got[-1] == lengths.max() and len(got) <= k
  values = sorted(set(lengths.tolist()))
  best = min(
      _cost(lengths, list(c) + [values[-1]], B)
      for n in range(k) for c in itertools.combinations(values[:-1], n))
  assert _cost(lengths, got, B) == best


def test_bucket_lengths_given_and_off():
  lengths = np.array([1, 3, 9])
  assert batching.bucket_lengths(lengths, 12, 1, 4) == (12,)
  assert batching.bucket_lengths(lengths, 12, 3, 4, (2, 5)) == (2, 5, 9)
  with pytest.raises(ValueError, match="must increase"):
    batching.bucket_lengths(lengths, 12, 3, 4, (5, 2))
  with pytest.raises(ValueError, match="lie in 1..12"):
    batching.bucket_lengths(lengths, 12, 3, 4, (2, 13))


@pytest.mark.parametrize("name", ["sasrec", "gru4rec"])
def test_cut_window_gives_the_full_window_outputs(make_config, name):
  """A window cut to its last t columns encodes its real items as the
  full left-padded window does (dropout off)."""
  config = make_config(**{"model.name": name})
  T, N = 12, 50
  model = models.build_model(config.model, N, T)
  params = init_params(model, T)
  lengths = np.array([1, 3, 5, 5])
  inputs = np.stack([data.left_pad(np.arange(1, n + 1) + 7 * i, T)
                     for i, n in enumerate(lengths)])
  full = model.encode(params, model.embed(params, inputs), inputs > 0)
  t = int(lengths.max())
  cut = inputs[:, T - t:]
  part = model.encode(params, model.embed(params, cut), cut > 0)
  np.testing.assert_allclose(part, full[:, T - t:], rtol=1e-5, atol=1e-6)
  # Scores of the last step, and so ranks, are the same too.
  np.testing.assert_allclose(evaluate.user_embeddings(model, params, cut),
                             evaluate.user_embeddings(model, params, inputs),
                             rtol=1e-5, atol=1e-6)


def test_cut_batch_gives_the_same_loss_and_gradient(make_config):
  """The deterministic objective (BCE + level 2) of a batch at its bucket
  length equals that of the full windows."""
  config = make_config(**{"model.dropout": 0.0})
  arrays = data.build_arrays(data.load_from_config(config.data), 12)
  model = models.build_model(config.model, arrays.num_items, 12)
  params = init_params(model, 12)
  lengths = np.sum(arrays.train_inputs > 0, axis=1)
  users = np.flatnonzero((lengths > 0) & (lengths <= 6))[:16]
  objective = adversarial.make_objective(
      model, adversarial.method_config("linear", eps=0.3))

  def batch(t):
    cols = slice(12 - t, 12)
    tg = arrays.train_targets[users][:, cols]
    return {"inputs": arrays.train_inputs[users][:, cols], "targets": tg,
            "negatives": np.where(tg > 0, (tg % arrays.num_items) + 1, 0),
            "weights": (tg > 0).astype(np.float32),
            "pert": (tg > 0).astype(np.float32)}

  # One program per width for both (loss and gradient).
  vg = jax.jit(jax.value_and_grad(
      lambda p, b: objective(p, b, jax.random.PRNGKey(1))[0]))
  (loss6, g6), (loss12, g12) = vg(params, batch(6)), vg(params, batch(12))
  np.testing.assert_allclose(loss6, loss12, rtol=1e-6)
  chex.assert_trees_all_close(g6, g12, rtol=1e-4, atol=1e-7)


def test_epoch_order_visits_every_user_once_per_epoch():
  rng = np.random.default_rng(0)
  users = np.arange(3, 103)
  lengths = rng.integers(1, 30, size=len(users))
  bounds = batching.choose_buckets(lengths, 3, 8)
  plan = batching.train_plan(users, lengths, bounds, 8)
  length_of = dict(zip(users.tolist(), lengths.tolist()))
  orders = []
  for e in range(2):
    b, u, real = map(np.asarray, batching.epoch_order(
        plan, jax.random.PRNGKey(e), jax.random.PRNGKey(10 + e)))
    assert u.shape == (plan.num_steps, 8)
    # Every training user exactly once with weight; the fill is repeats.
    assert sorted(u[real].tolist()) == sorted(users.tolist())
    assert set(u[~real].tolist()) <= set(users.tolist())
    for step in range(plan.num_steps):  # each batch fits its bucket
      assert max(length_of[x] for x in u[step]) <= bounds[b[step]]
      lower = bounds[b[step] - 1] if b[step] else 0
      assert min(length_of[x] for x in u[step]) > lower
    orders.append(u[real].tolist())
  assert orders[0] != orders[1]  # a fresh order each epoch
  # The buckets' batches are interleaved, not one bucket after another.
  assert len(set(np.asarray(b[:plan.num_steps // 2]).tolist())) > 1


def test_bucketed_ranks_equal_full_ranks(make_config):
  config = make_config()
  ds = data.load_from_config(config.data)
  T = config.data.max_len
  arrays = data.build_arrays(ds, T)
  dd = train.device_data(arrays)
  model = models.build_model(config.model, arrays.num_items, T)
  params = init_params(model, T)
  lens = batching.test_window_lengths(ds, T)
  np.testing.assert_array_equal(lens, np.sum(arrays.test_inputs > 0, 1))
  plan = batching.eval_plan(lens, batching.choose_buckets(lens, 3, 32))
  assert len(plan.lengths) > 1 and plan.lengths[0] < T
  scores = evaluate.model_scores(model)
  for split in ("valid", "test"):
    args = (params, *evaluate.split_inputs(dd, split), dd["history"])
    full = evaluate.make_ranker(scores, arrays.num_items, 32)(*args)
    part = evaluate.make_ranker(scores, arrays.num_items, 32, plan=plan)(*args)
    chunked = evaluate.make_chunked_ranker(model, arrays.num_items, 32, 40,
                                           plan=plan)(*args)
    np.testing.assert_array_equal(part, full)
    np.testing.assert_array_equal(chunked, full)


def test_bucketed_epoch_compiles_once_with_one_branch_per_bucket(make_config):
  # GRU4Rec: its three branches compile in about half the time of SASRec.
  config = make_config(**{"model.name": "gru4rec"})
  arrays = data.build_arrays(data.load_from_config(config.data), 12)
  dd = train.device_data(arrays)
  model = models.build_model(config.model, arrays.num_items, 12)
  opt = train.make_optimizer(config.train)
  plan = batching.plan_from_table(arrays.train_inputs, arrays.train_users,
                                  64, num_buckets=3)
  assert len(plan.lengths) == 3
  traced = []
  objective = adversarial.make_objective(model,
                                         adversarial.method_config("none"))

  def counting(params, batch, rng):
    traced.append(batch["inputs"].shape[1])
    return objective(params, batch, rng)

  epoch, steps = train.make_train_epoch(counting, opt, arrays.num_items, plan)
  state = train.init_state(model, opt, jax.random.PRNGKey(0), 12)
  pert = (dd["train_inputs"] > 0).astype(jnp.float32)
  for e in range(3):
    state, terms = epoch(state, dd, pert, jax.random.PRNGKey(e),
                         jax.random.PRNGKey(e))
  assert epoch.program._cache_size() == 1
  assert sorted(set(traced)) == sorted(plan.lengths)
  assert len(traced) == len(plan.lengths)  # each branch traced once
  assert int(state.step) == 3 * steps
  chex.assert_tree_all_finite(terms)


@pytest.mark.parametrize("num_buckets", [1, 3])
def test_bucketed_steps_weigh_every_position_alike(make_config, num_buckets):
  """With buckets, a step's loss is a sum over its positions divided by what
  an average batch holds, so one epoch of plain SGD on a loss whose
  gradient is 1 per position moves a parameter by users / B in total (a
  per-batch mean would move it by 1 per step instead)."""
  import optax
  config = make_config()
  arrays = data.build_arrays(data.load_from_config(config.data), 12)
  dd = train.device_data(arrays)
  plan = batching.plan_from_table(arrays.train_inputs, arrays.train_users,
                                  64, num_buckets=num_buckets)
  assert len(plan.lengths) == num_buckets

  def objective(params, batch, rng):
    del rng
    loss = losses.weighted_mean(params["c"] * jnp.ones_like(batch["weights"]),
                                batch["weights"])
    return loss, {"loss": loss}

  epoch, steps = train.make_train_epoch(objective, optax.sgd(1.0),
                                        arrays.num_items, plan)
  state = train.TrainState(step=jnp.zeros((), jnp.int32),
                           params={"c": jnp.zeros(())},
                           opt_state=optax.sgd(1.0).init({"c": jnp.zeros(())}))
  pert = (dd["train_inputs"] > 0).astype(jnp.float32)
  state, _ = epoch(state, dd, pert, jax.random.PRNGKey(0),
                   jax.random.PRNGKey(0))
  moved = -float(state.params["c"])
  if num_buckets == 1:
    assert moved == pytest.approx(steps)
  else:
    assert moved == pytest.approx(len(plan.users) / 64, rel=1e-5)
