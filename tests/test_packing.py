"""Packed rows (`packing`): the layout, and what models and methods see."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cat_jax import adversarial, models, packing, sampling, train


def windows(rng, num_users, T, num_items):
  """Left-padded [U, T] windows with 1..T real items each."""
  lens = rng.integers(1, T + 1, size=num_users)
  lens[:3] = (T, 1, T // 2)  # the extremes are always there
  win = np.zeros((num_users, T), np.int32)
  for u, n in enumerate(lens):
    win[u, T - n:] = rng.integers(1, num_items + 1, size=n)
  return win, lens


def test_pack_lengths_fits_without_overlap_and_is_nearly_full():
  rng = np.random.default_rng(0)
  cap = 50
  # Amazon-like: mostly short, a long tail up to the whole row.
  lens = np.minimum(rng.geometric(1 / 7, size=3000) + 2, cap)
  row, start = packing.pack_lengths(lens, cap)
  cells = {}
  for i, (r, s, n) in enumerate(zip(row, start, lens)):
    assert 0 <= s and s + n <= cap
    for c in range(s, s + n):
      assert (r, c) not in cells  # no two sequences share a cell
      cells[(r, c)] = i
  lower = -(-lens.sum() // cap)
  assert row.max() + 1 <= 1.02 * lower + 1  # best-fit decreasing: ~full
  with pytest.raises(ValueError, match="1..50"):
    packing.pack_lengths([0, 3], cap)


def test_epoch_order_visits_every_user_once_with_their_windows():
  rng = np.random.default_rng(1)
  T, U = 10, 60
  win, lens = windows(rng, U, T, 40)
  users = np.arange(5, U)  # not every table row trains
  plan = packing.packed_plan(users, lens[users], T, batch_size=12)
  assert plan.rows_per_batch == round(12 * lens[users].mean() / T)
  order = packing.order_arrays(plan)
  pairs = []
  for e in range(2):
    rows, slot_user = packing.epoch_order(plan, jax.random.PRNGKey(e), order)
    assert rows.shape == (plan.num_steps, plan.rows_per_batch)
    seen, together = [], set()
    for s in range(plan.num_steps):
      b = jax.tree.map(np.asarray, packing.batch_rows(
          order, rows[s], slot_user, {"inputs": jnp.asarray(win)}))
      assert not np.any(b["inputs"][~b["real"]])
      for r in range(b["real"].shape[0]):
        cols = np.flatnonzero(b["real"][r])
        for seg in np.unique(b["segments"][r, cols]):
          at = cols[b["segments"][r, cols] == seg]
          u = b["users"][r, at[0]]
          assert np.all(b["users"][r, at] == u)
          assert np.all(np.diff(at) == 1)  # contiguous
          # The user's whole window, in order, at its own positions.
          np.testing.assert_array_equal(b["positions"][r, at],
                                        np.arange(T - lens[u], T))
          np.testing.assert_array_equal(b["inputs"][r, at],
                                        win[u, T - lens[u]:])
          seen.append(u)
        us = sorted(set(b["users"][r, cols]))
        together |= {(a, c) for a in us for c in us if a < c}
      # Ids tell sequences apart across the batch, not only within a row.
      real = b["real"]
      ids = {(int(i), int(u)) for i, u in zip(b["segments"][real],
                                                b["users"][real])}
      assert len({i for i, _ in ids}) == len(ids)
    assert sorted(seen) == sorted(users.tolist())
    pairs.append(together)
  assert pairs[0] != pairs[1]  # who shares a row changes between epochs


def test_rows_that_do_not_split_over_the_devices_are_a_clear_error(
    make_config):
  from cat_jax import batching, data
  config = make_config(**{"train.layout": "packed"})
  ds = data.load_from_config(config.data)
  dd = batching.device_data(data.build_arrays(ds, 12))
  mean = train.make_plans(config, ds, dd)[0].mean_length
  # A batch size whose automatic row count is odd.
  odd = next(b for b in range(16, 200)
             if packing.auto_rows_per_batch(b, mean, 12) % 2)
  for rows, match in ((3, r"multiple of 2\.$"), (0, "0 chose that number")):
    config.train.pack_rows, config.train.batch_size = rows, odd
    with pytest.raises(ValueError, match=match):
      train.make_plans(config, ds, dd, mesh_size=2)
  config.train.pack_rows = 4
  assert train.make_plans(config, ds, dd, mesh_size=2)[0].rows_per_batch == 4


def _model(name, N, T):
  cfg = ml_collections.ConfigDict(dict(name=name, hidden=16, num_blocks=2,
                                       num_heads=2, dropout=0.2,
                                       dtype="float32"))
  model = models.build_model(cfg, N, T)
  return model, jax.jit(model.init)(jax.random.PRNGKey(0),
                                    jnp.ones((1, T), jnp.int32))


def _packed_batches(win, lens, T, rows_per_batch=3):
  plan = packing.packed_plan(np.arange(len(lens)), lens, T, 8,
                             rows_per_batch)
  order = packing.order_arrays(plan)
  rows, slot_user = packing.epoch_order(plan, jax.random.PRNGKey(3), order)
  return [packing.batch_rows(order, rows[s], slot_user,
                             {"inputs": jnp.asarray(win)})
          for s in range(plan.num_steps)]


@pytest.mark.parametrize("name", models.MODELS)
def test_packed_encoder_gives_each_sequence_its_own_window(name):
  rng = np.random.default_rng(2)
  T, N = 8, 30
  win, lens = windows(rng, 20, T, N)
  model, params = _model(name, N, T)

  @jax.jit  # one program per shape, not one per op
  def encode(inputs, segments=None, positions=None):
    return model.encode(params, model.embed(params, inputs), inputs > 0,
                        segments=segments, positions=positions)

  full = encode(jnp.asarray(win))
  for b in _packed_batches(win, lens, T):
    W = encode(b["inputs"], b["segments"], b["positions"])
    want = full[b["users"], b["positions"]]
    real = np.asarray(b["real"])[..., None]
    np.testing.assert_allclose(np.where(real, W, 0), np.where(real, want, 0),
                               atol=2e-5)
    assert not np.any(np.where(real, 0, W))  # empty tokens stay 0


@pytest.mark.parametrize("budget,relative", [("equal", False),
                                             ("mean", False),
                                             ("equal", True)])
def test_budgeted_perturbation_norms_are_per_packed_sequence(budget,
                                                             relative):
  rng = np.random.default_rng(4)
  B, T, d = 3, 7, 4
  segments = np.array([[0, 0, 0, 3, 3, 5, 21],
                       [7, 7, 7, 7, 7, 7, 7],
                       [14, 14, 16, 16, 16, 16, 21]])
  w = rng.uniform(0.5, 2.0, (B, T))
  w[segments == 21] = 0  # empty tokens
  g = rng.normal(size=(B, T, d))
  ref = rng.normal(size=(B, T, d))
  eps = 0.7
  cfg = adversarial.method_config("cas", budget=budget, relative=relative)
  got = np.asarray(adversarial.budgeted_perturbation(
      jnp.asarray(g), jnp.asarray(w), eps, cfg,
      jnp.asarray(ref) if relative else None, jnp.asarray(segments)))
  want = np.zeros_like(g)
  for s in np.unique(segments[segments != 21]):
    at = segments == s
    size = eps * (np.linalg.norm(ref[at]) if relative else 1.0)
    wd = w[at][:, None] * g[at]
    if budget == "equal":
      want[at] = size * wd / np.linalg.norm(wd)
    else:
      want[at] = w[at][:, None] * size * g[at] / np.linalg.norm(g[at])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_sequence_factors_are_per_packed_sequence():
  rng = np.random.default_rng(5)
  W = rng.normal(size=(2, 5, 3))
  weights = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1.]])
  segments = np.array([[0, 0, 2, 2, 10], [5, 5, 5, 8, 8]])
  got = np.asarray(adversarial.sequence_factors(
      jnp.asarray(W), jnp.asarray(weights), jnp.asarray(segments)))
  norms = np.linalg.norm(W, axis=-1)
  c = 1 / (1 + np.exp(-(norms - norms[weights > 0].mean())))
  for s in (0, 2, 5, 8):
    at = segments == s
    np.testing.assert_allclose(got[at], c[at].mean(), rtol=1e-5)


@pytest.mark.parametrize("magnitude", ["uniform", "pamacf"])
def test_seq_perturbation_packed_equals_each_window(magnitude):
  """Method `seq` (no random start): the level-1 perturbation of a packed
  batch is, sequence by sequence, the one of the same users' windows."""
  rng = np.random.default_rng(6)
  T, N = 8, 30
  win, lens = windows(rng, 16, T, N)
  model, params = _model("sasrec", N, T)
  cfg = adversarial.method_config("seq", eps=0.4, magnitude=magnitude)
  neg = rng.integers(1, N + 1, size=win.shape)
  E = model.items(params)

  @jax.jit
  def delta(inputs, negs, segments=None, positions=None):
    S = model.embed(params, inputs)
    enc = lambda s: model.encode(params, s, inputs > 0, segments=segments,
                                 positions=positions)
    w = (inputs > 0).astype(jnp.float32)
    return adversarial.level1_perturbation(
        enc, S, w, None, cfg, pos=E[inputs], neg=E[negs],
        segments=segments)

  for b in _packed_batches(win, lens, T, rows_per_batch=20):  # one batch
    users = np.unique(np.asarray(b["users"])[np.asarray(b["real"])])
    negs = jnp.where(b["real"], jnp.asarray(neg)[b["users"], b["positions"]],
                     0)
    got = delta(b["inputs"], negs, b["segments"], b["positions"])
    alone = delta(jnp.asarray(win[users]), jnp.asarray(neg[users]))
    row = {u: i for i, u in enumerate(users)}
    want = alone[jnp.asarray([[row.get(int(u), 0) for u in r]
                              for r in np.asarray(b["users"])]),
                 b["positions"]]
    real = np.asarray(b["real"])[..., None]
    np.testing.assert_allclose(np.where(real, got, 0),
                               np.where(real, want, 0), atol=1e-5)


def test_in_history_at_and_negatives_at_match_brute_force():
  rng = np.random.default_rng(7)
  for H in (1, 2, 5, 8, 13):
    hist = np.sort(rng.integers(1, 20, size=(6, H)), axis=1)
    hist[:, H // 2 + 1:] = 10 ** 6  # sentinel padding
    rows = rng.integers(0, 6, size=(4, 9))
    items = rng.integers(0, 22, size=(4, 9))
    got = np.asarray(sampling.in_history_at(
        jnp.asarray(hist), jnp.asarray(rows), jnp.asarray(items)))
    want = np.vectorize(lambda r, i: i in hist[r])(rows, items)
    np.testing.assert_array_equal(got, want)
  neg = np.asarray(sampling.sample_negatives_at(
      jax.random.PRNGKey(0), jnp.asarray(hist), jnp.asarray(rows), 20))
  assert neg.shape == rows.shape and neg.min() >= 1 and neg.max() <= 20
  assert not np.any(np.vectorize(lambda r, i: i in hist[r])(rows, neg))


def test_packed_training_learns_with_one_branch(make_config, tmp_path):
  """End to end: phase 1 packed beats popularity; `cas` trains on; the
  epoch program has no switch over lengths (one shape)."""
  from cat_jax import adversarial as adv, batching, cascade, data
  config = make_config(**{"train.layout": "packed", "train.epochs": 12,
                          "train.eval_every": 4, "adv.method": "cas",
                          "adv.epochs": 2, "adv.eps": 0.5})
  results = train.train_and_evaluate(config, str(tmp_path))
  pop = results["popularity/valid"]["ndcg@10"]
  assert results["pretrain"]["test/ndcg@10"] > 1.5 * pop
  assert np.isfinite(results["cas"]["test/ndcg@10"])
  arrays = data.build_arrays(data.load_from_config(config.data), 12)
  plan, _ = train.make_plans(config, data.load_from_config(config.data),
                             batching.device_data(arrays))
  assert isinstance(plan, packing.PackedPlan)
  model = models.build_model(config.model, arrays.num_items, 12)
  opt = train.make_optimizer(config.train)
  program = train.epoch_program(
      adv.make_objective(model, adv.method_config("cas")), opt,
      arrays.num_items, plan)
  dd = batching.device_data(arrays)
  state = train.init_state(model, opt, jax.random.PRNGKey(0), 12)
  pert = cascade.weights_for_method(dd["train_inputs"], 64, "cas")
  text = str(program.trace(
      state, dd, pert, {}, packing.order_arrays(plan),
      jax.random.PRNGKey(1), jax.random.PRNGKey(2)).jaxpr)
  assert "scan[" in text and " cond[" not in text


def test_layout_is_in_the_signature_only_when_packed(make_config):
  """Workdirs written before train.layout keep their signature (buckets is
  the old behaviour); a packed run does not resume a bucketed one."""
  from cat_jax import workdir
  old = workdir.phase_signature(make_config(), workdir.PRETRAIN)
  assert "layout" not in old["train"] and "pack_rows" not in old["train"]
  packed = workdir.phase_signature(make_config(**{"train.layout": "packed"}),
                                   workdir.PRETRAIN)
  assert packed["train"]["layout"] == "packed" and packed != old
