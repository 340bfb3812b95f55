import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cat_jax import adversarial, data as data_lib, evaluate, models, train
from cat_jax import batching, robustness

N, T, D, H = 25, 6, 8, 5


def tiny_model(name="sasrec"):
  cfg = ml_collections.ConfigDict(dict(name=name, hidden=D, num_blocks=1,
                                       num_heads=1, dropout=0.2))
  model = models.build_model(cfg, N, T)
  init = jax.jit(model.init)  # faster than Flax's eager init
  return model, init(jax.random.PRNGKey(0), jnp.ones((1, T), jnp.int32))


def toy_users(B=7, seed=0):
  """Left-padded windows, targets, histories (sorted, sentinel N+1), extra.

  Numpy arrays: Python loops over them stay fast.
  """
  rng = np.random.default_rng(seed)
  inputs = np.zeros((B, T), np.int32)
  history = np.full((B, H), N + 1, np.int32)
  targets, extra = np.zeros(B, np.int32), np.zeros(B, np.int32)
  for b in range(B):
    length = [T, 1, 2][b] if b < 3 else rng.integers(1, T + 1)
    items = rng.choice(np.arange(1, N + 1), length + H + 2, replace=False)
    inputs[b, T - length:] = items[:length]
    nh = rng.integers(0, H + 1)
    history[b, :nh] = np.sort(items[length:length + nh])
    targets[b], extra[b] = items[-1], items[-2] if b % 2 else 0
  return inputs, targets, history, extra


def forbidden_set(inputs, target, history, extra):
  """The items an attack must never write, as a Python set."""
  return ({0, int(target), int(extra)} | {int(i) for i in inputs}
          | {int(h) for h in history if h <= N})


def greedy_nearest(table, points, valid, forbidden, originals=None):
  """Brute force of one row: positions pick latest first, distinct items.

  With `originals` (mode `snap`) the original item competes: it wins ties,
  and a position it wins picks 0 and takes nothing from the others.
  """
  picks, taken = [0] * len(points), set(forbidden)
  for k in reversed(range(len(points))):
    if not valid[k]:
      continue
    dist = {j: np.sum((table[j] - points[k]) ** 2)
            for j in range(1, N + 1) if j not in taken}
    best = min(dist, key=dist.get)
    if (originals is None
        or dist[best] < np.sum((table[originals[k]] - points[k]) ** 2)):
      picks[k] = best
      taken.add(best)
  return picks


def reference_positions(window, where, k):
  real = [t for t in range(T) if window[t] > 0]
  if where == "first":
    return real[:1]
  if where == "middle":
    return real[(len(real) - 1) // 2:][:1]
  return [t for t in range(T - k, T) if t in real]


def test_positions_resolve_for_left_padded_windows():
  windows = jnp.array([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6],
                       [0, 0, 0, 0, 0, 9], [0, 0, 0, 0, 3, 4],
                       [0, 0, 0, 0, 0, 0]])
  pos = lambda w, k=1: tuple(np.asarray(a) for a in
                             robustness.attack_positions(windows, w, k))
  p, v = pos("first")
  np.testing.assert_array_equal(p[:4, 0], [2, 0, 5, 4])
  p, v = pos("middle")  # lower middle of an even number of items
  np.testing.assert_array_equal(p[:4, 0], [3, 2, 5, 4])
  p, v = pos("last")
  np.testing.assert_array_equal(p[:, 0], 5)
  np.testing.assert_array_equal(v[:, 0], [True] * 4 + [False])
  p, v = pos("last", 3)
  np.testing.assert_array_equal(p, np.broadcast_to([3, 4, 5], (5, 3)))
  np.testing.assert_array_equal(v, [[1, 1, 1], [1, 1, 1], [0, 0, 1],
                                    [0, 1, 1], [0, 0, 0]])
  # Random windows against the list-based definition.
  inputs = toy_users(B=40, seed=3)[0]
  for where, k in [("first", 1), ("middle", 1), ("last", 1), ("last", 4)]:
    p, v = (np.asarray(a) for a in robustness.attack_positions(inputs, where,
                                                                k))
    for b in range(len(inputs)):
      assert sorted(p[b][v[b]]) == reference_positions(inputs[b], where, k)
  # Anchor 'window': the fixed slots 0 and (6 - 1) // 2 = 2, where real.
  p, v = (np.asarray(a) for a in
          robustness.attack_positions(windows, "first", 1, 6))
  np.testing.assert_array_equal(v[:, 0], [0, 1, 0, 0, 0])
  assert p[1, 0] == 0
  p, v = (np.asarray(a) for a in
          robustness.attack_positions(windows, "middle", 1, 6))
  np.testing.assert_array_equal(v[:, 0], [1, 1, 0, 0, 0])
  np.testing.assert_array_equal(p[:2, 0], [2, 2])
  # A length bucket holds the last 4 columns: slot 0 was cut off, slot 2
  # is its column 0.
  short = windows[jnp.array([0, 2, 3, 4])][:, 2:]
  p, v = (np.asarray(a) for a in
          robustness.attack_positions(short, "first", 1, 6))
  assert not v.any()
  p, v = (np.asarray(a) for a in
          robustness.attack_positions(short, "middle", 1, 6))
  np.testing.assert_array_equal(v[:, 0], [1, 0, 0, 0])
  assert p[0, 0] == 0
  for where in ("first", "middle"):
    slot = 0 if where == "first" else (T - 1) // 2
    p, v = (np.asarray(a) for a in
            robustness.attack_positions(inputs, where, 1, T))
    for b in range(len(inputs)):
      want = [slot] if inputs[b][slot] > 0 else []
      assert list(p[b][v[b]]) == want
  with pytest.raises(ValueError, match="at least the width"):
    robustness.attack_positions(windows, "first", 1, 5)
  with pytest.raises(ValueError, match="Unknown position"):
    robustness.attack_positions(windows, "end")
  with pytest.raises(ValueError, match="Only 'last'"):
    robustness.attack_positions(windows, "first", 2)


def test_allowed_replacements_match_a_python_set():
  inputs, targets, history, extra = toy_users(B=12, seed=1)
  allowed = np.asarray(robustness.allowed_replacements(
      inputs, targets, history, extra, N))
  for b in range(len(inputs)):
    forbidden = forbidden_set(inputs[b], targets[b], history[b], extra[b])
    assert set(np.flatnonzero(allowed[b])) == set(range(N + 1)) - forbidden


@functools.lru_cache(maxsize=None)
def jitted_attack(mode, batch_size):
  """Cached so that each (mode, K) compiles once for the whole file."""
  model, params = tiny_model()
  return model, params, robustness.make_attack(model, N, batch_size, mode)


@functools.lru_cache(maxsize=None)
def row_gradient_fn(model):
  """Per-row gradients, one row at a time (not the batch-sum shortcut)."""
  def loss(params, s, ids, t):
    W = model.encode(params, s[None], ids[None] > 0)[0, -1]
    return jax.nn.softplus(-W @ model.items(params)[t])

  @jax.jit
  def grads(params, inputs, targets):
    S = model.embed(params, inputs)
    return jax.vmap(jax.grad(loss, argnums=1), (None, 0, 0, 0))(
        params, S, inputs, targets)
  return grads


def step_expectation(model, params, inputs, targets, history, extra, pos,
                     valid, alpha, snap=False):
  """(inputs, expected windows) of mode `step` (or `snap`) by brute force:
  per row, the step points e + alpha g/||g|| from per-row gradients, then
  `greedy_nearest`."""
  table = np.asarray(model.items(params), np.float64)
  grads = np.asarray(row_gradient_fn(model)(params, inputs, targets))
  x, pos, valid = (np.asarray(a) for a in (inputs, pos, valid))
  expected = x.copy()
  for b in range(len(x)):
    g = grads[b, pos[b]]
    # Padding positions have g = 0; they are invalid and never replaced.
    norm = np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), 1e-30)
    origs = x[b, pos[b]]
    points = table[origs] + alpha * g / norm
    forbidden = forbidden_set(x[b], targets[b], history[b], extra[b])
    picks = greedy_nearest(table, points, valid[b], forbidden,
                           origs if snap else None)
    for p, v, j in zip(pos[b], valid[b], picks):
      if v and j:
        expected[b, p] = j
  return x, expected


@pytest.mark.parametrize("where,k,alpha", [
    ("first", 1, 0.3), ("middle", 1, 0.3), ("last", 1, 0.3),
    ("last", 3, 0.3), ("last", 3, 1e-6)])
def test_step_attack_is_the_nearest_allowed_item(where, k, alpha):
  # Batch size 3 does not divide the 7 users: the padding rows are exercised.
  model, params, attack = jitted_attack("step", 3)
  inputs, targets, history, extra = toy_users()
  users = jnp.arange(len(inputs))
  pos, valid = robustness.attack_positions(inputs, where, k)
  out = np.asarray(attack(params, inputs, targets, users, extra, history,
                          pos, valid, alpha, jax.random.PRNGKey(0)))
  x, expected = step_expectation(model, params, inputs, targets, history,
                                 extra, pos, valid, alpha)
  np.testing.assert_array_equal(out, expected)
  for b in range(len(x)):
    changed = np.flatnonzero(out[b] != x[b])
    assert len(changed) == np.asarray(valid)[b].sum()
    forbidden = forbidden_set(x[b], targets[b], history[b], extra[b])
    assert not set(out[b, changed].tolist()) & forbidden


def test_tiny_alpha_picks_the_originals_nearest_allowed_neighbour():
  model, params, attack = jitted_attack("step", 3)
  inputs, targets, history, extra = toy_users(seed=5)
  table = np.asarray(model.items(params), np.float64)
  for where in robustness.POSITIONS:
    pos, valid = robustness.attack_positions(inputs, where)
    out = np.asarray(attack(params, inputs, targets, jnp.arange(len(inputs)),
                            extra, history, pos, valid, 1e-6,
                            jax.random.PRNGKey(0)))
    for b, p in enumerate(np.asarray(pos)[:, 0]):
      original = int(inputs[b, p])
      forbidden = forbidden_set(inputs[b], targets[b], history[b], extra[b])
      dist = {j: np.linalg.norm(table[j] - table[original])
              for j in range(1, N + 1) if j not in forbidden}
      assert out[b, p] == min(dist, key=dist.get)


@pytest.mark.parametrize("where,k,alpha", [
    ("last", 1, 0.05), ("last", 3, 0.3), ("middle", 1, 1.0),
    ("last", 3, 3.0)])
def test_snap_attack_keeps_the_original_when_it_is_nearest(where, k, alpha):
  model, params, attack = jitted_attack("snap", 3)
  inputs, targets, history, extra = toy_users(B=12, seed=3)
  pos, valid = robustness.attack_positions(inputs, where, k)
  out = np.asarray(attack(params, inputs, targets, jnp.arange(len(inputs)),
                          extra, history, pos, valid, alpha,
                          jax.random.PRNGKey(0)))
  x, expected = step_expectation(model, params, inputs, targets, history,
                                 extra, pos, valid, alpha, snap=True)
  np.testing.assert_array_equal(out, expected)
  changed = int(np.sum(out != x))
  kept = int(np.sum(np.asarray(valid))) - changed
  if alpha <= 0.05:  # a tiny step stays nearest to the original
    assert changed == 0 and kept > 0
  if alpha >= 3.0:   # a long one leaves it behind
    assert changed > kept


def l2(a, b):
  return np.sum((a - b) ** 2)


def negative_cosine(a, b):
  return -(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))


def greedy_minimal(table, origs, grads, valid, forbidden, distance=l2):
  """Brute force of the `minimal` rule for one row: positions pick latest
  first, among the allowed j with <E_j - e, g> > 0 the nearest to e
  (`distance`: l2 for `minimal`, negative_cosine for `cosine`)."""
  picks, taken = [0] * len(origs), set(forbidden)
  for k in reversed(range(len(origs))):
    if not valid[k]:
      continue
    e, g = table[origs[k]], grads[k]
    dist = {j: distance(table[j], e) for j in range(1, len(table))
            if j not in taken and (table[j] - e) @ g > 0}
    if dist:
      picks[k] = min(dist, key=dist.get)
      taken.add(picks[k])
  return picks


@pytest.mark.parametrize("mode,where,k", [
    ("minimal", "first", 1), ("minimal", "middle", 1), ("minimal", "last", 1),
    ("minimal", "last", 3), ("cosine", "middle", 1), ("cosine", "last", 3)])
def test_minimal_attack_matches_brute_force(mode, where, k):
  model, params, attack = jitted_attack(mode, 3)
  inputs, targets, history, extra = toy_users(seed=7)
  pos, valid = robustness.attack_positions(inputs, where, k)
  out = np.asarray(attack(params, inputs, targets, jnp.arange(len(inputs)),
                          extra, history, pos, valid, 0.0,
                          jax.random.PRNGKey(0)))
  table = np.asarray(model.items(params), np.float64)
  grads = np.asarray(row_gradient_fn(model)(params, inputs, targets),
                     np.float64)
  pos, valid = np.asarray(pos), np.asarray(valid)
  for b in range(len(inputs)):
    forbidden = forbidden_set(inputs[b], targets[b], history[b], extra[b])
    picks = greedy_minimal(
        table, inputs[b, pos[b]], grads[b, pos[b]], valid[b], forbidden,
        l2 if mode == "minimal" else negative_cosine)
    expected = inputs[b].copy()
    for p, j in zip(pos[b], picks):
      if j:
        expected[p] = j
    np.testing.assert_array_equal(out[b], expected, err_msg=f"row {b}")
    # Each pick lies in the gradient direction from the original.
    for p, j in zip(pos[b], picks):
      if j:
        e, g = table[inputs[b, p]], grads[b, p]
        assert (table[j] - e) @ g > 0


class SumModel:
  """A hand-built model: W_t is the sum of the real embeddings up to t, so
  the target-loss gradient at every real position is -s(-<W_T, E_t>) E_t,
  the direction of -E_target."""

  def __init__(self, table):
    self.table = jnp.asarray(table, jnp.float32)

  def items(self, params):
    return self.table

  def embed(self, params, inputs):
    return self.table[inputs]

  def encode(self, params, S, mask, train=False, rng=None):
    return jnp.cumsum(S * mask[..., None], axis=1)


HAND_TABLE = np.array([
    [0.0, 0.0],     # 0 padding
    [1.0, 1.0],     # 1 the last window item, e
    [-1.0, 0.0],    # 2 the target: the gradient points along +x
    [0.9, 1.0],     # 3 nearest to e overall, but E_3 - e has negative cosine
    [1.15, 1.0],    # 4 nearest in the gradient direction, but in the history
    [1.2, 1.1],     # 5 the rule's pick for item 1
    [1.0, 1.2],     # 6 nearer than 5, E_6 - e orthogonal to g: not allowed
    [3.0, 1.0],     # 7 far, positive cosine
    [1.5, 5.0],     # 8 farther, positive cosine
    [1.0, 1.05],    # 9 the second-to-last window item
    [-3.0, -3.0]])  # 10 behind everything
HN = len(HAND_TABLE) - 1


def hand_attack(windows, targets, histories, extra, where, k):
  windows = jnp.asarray(windows, jnp.int32)
  history = np.full((len(windows), 2), HN + 1, np.int32)
  for b, h in enumerate(histories):
    history[b, :len(h)] = sorted(h)
  pos, valid = robustness.attack_positions(windows, where, k)
  return np.asarray(robustness.attack_batch(
      SumModel(HAND_TABLE), None, windows, jnp.asarray(targets, jnp.int32),
      jnp.asarray(history), jnp.asarray(extra, jnp.int32), pos, valid, 0.0,
      jax.random.PRNGKey(0), HN, mode="minimal"))


def test_minimal_attack_on_a_hand_built_table():
  # The premises of the table.
  e, g = HAND_TABLE[1], np.array([1.0, 0.0])
  d = np.linalg.norm(HAND_TABLE - e, axis=1)
  outside = [j for j in np.argsort(d) if j not in (0, 1, 9)]  # not in window
  assert outside[0] == 3 and (HAND_TABLE[3] - e) @ g < 0
  assert (HAND_TABLE[4] - e) @ g > 0 and d[4] < d[6] < d[5]
  assert (HAND_TABLE[6] - e) @ g == 0
  window = [0, 0, 9, 1]
  out = hand_attack([window] * 4, [2, 2, 2, 2], [[4], [4], [4], []],
                    [0, 0, 7, 0], "last", 1)
  # 3 has negative cosine, 4 is history, 6 is orthogonal: 5.
  np.testing.assert_array_equal(out[0], [0, 0, 9, 5])
  # Without the history item, 4 is the nearest in the gradient direction.
  np.testing.assert_array_equal(out[3], [0, 0, 9, 4])
  # Last two: the last position picks 5 first; item 9 would also take 5,
  # so it takes the next one in its gradient direction, 7 (or 8 when 7 is
  # the excluded extra item).
  out = hand_attack([window] * 3, [2, 2, 2], [[4], [4], [4]], [0, 7, 0],
                    "last", 2)
  np.testing.assert_array_equal(out[0], [0, 0, 7, 5])
  np.testing.assert_array_equal(out[1], [0, 0, 8, 5])
  # Nothing lies in the gradient direction of item 7 (the largest x): the
  # position is left alone.
  out = hand_attack([[0, 0, 0, 7]], [2], [[]], [0], "last", 1)
  np.testing.assert_array_equal(out[0], [0, 0, 0, 7])
  # The first item (9) of a window, through the same rule: 5 again.
  out = hand_attack([[0, 0, 9, 1]], [2], [[4]], [0], "first", 1)
  np.testing.assert_array_equal(out[0], [0, 0, 5, 1])


def test_gradient_is_an_alias_of_step():
  """'gradient' (the name before issue 12, in RESULTS.md's commands)."""
  assert robustness.resolve_mode("gradient") == "step"
  assert [robustness.resolve_mode(m) for m in robustness.MODES] == list(
      robustness.MODES)
  with pytest.raises(ValueError, match="Unknown attack mode 'nearest'"):
    robustness.resolve_mode("nearest")
  with pytest.raises(ValueError, match="Unknown attack mode 'nearest'"):
    robustness.make_attack(tiny_model()[0], N, 3, "nearest")


def test_pick_distinct_leaves_a_position_alone_when_nothing_is_left():
  cost = jnp.array([[[0.0, 3.0, 1.0, 2.0]] * 3])  # [1, K=3, N+1=4]
  allowed = jnp.array([[False, True, True, False]])
  picks = robustness.pick_distinct(cost, allowed, jnp.ones((1, 3), bool))
  # The last position picks first (item 2), then item 1, then nothing.
  np.testing.assert_array_equal(np.asarray(picks), [[0, 1, 2]])
  picks = robustness.pick_distinct(cost, allowed,
                                   jnp.array([[True, True, False]]))
  np.testing.assert_array_equal(np.asarray(picks), [[1, 2, 0]])
  # +inf cost: the item may not go to that position.
  # The last position takes 1 (2 may not go there); the first may take only
  # 1, which is gone: it picks nothing.
  cost = jnp.array([[[0.0, 1.0, jnp.inf, 2.0], [0.0, 5.0, jnp.inf, 2.0]]])
  picks = robustness.pick_distinct(cost, allowed, jnp.ones((1, 2), bool))
  np.testing.assert_array_equal(np.asarray(picks), [[0, 1]])
  cost = cost.at[0, 0, 2].set(3.0)  # now 2 may go to the first position
  picks = robustness.pick_distinct(cost, allowed, jnp.ones((1, 2), bool))
  np.testing.assert_array_equal(np.asarray(picks), [[2, 1]])


def test_random_baseline_respects_exclusions_and_is_uniform():
  _, params, attack = jitted_attack("random", 3)
  inputs, targets, history, extra = toy_users(seed=2)
  users = jnp.arange(len(inputs))
  pos, valid = robustness.attack_positions(inputs, "last", 3)
  draws = 300
  outs = np.stack([np.asarray(attack(
      params, inputs, targets, users, extra, history, pos, valid, 0.0,
      jax.random.PRNGKey(i))) for i in range(draws)])
  attacked = np.zeros((len(inputs), T), bool)
  attacked[:, T - 3:] = np.asarray(valid)
  for b in range(len(inputs)):
    forbidden = forbidden_set(inputs[b], targets[b], history[b], extra[b])
    allowed = set(range(N + 1)) - forbidden
    new = outs[:, b, attacked[b]]
    assert set(new.ravel().tolist()) <= allowed
    assert (outs[:, b, ~attacked[b]] == inputs[b, ~attacked[b]]).all()
    for row in new:  # distinct within a window
      assert len(set(row.tolist())) == len(row)
    if attacked[b].any():
      # The last position draws first, from the whole allowed set.
      counts = np.bincount(new[:, -1], minlength=N + 1)[sorted(allowed)]
      expected = draws / len(allowed)
      assert counts.min() > 0.3 * expected and counts.max() < 2 * expected
  # Same key, same attack; another key, another one.
  again = np.asarray(attack(params, inputs, targets, users, extra, history,
                            pos, valid, 0.0, jax.random.PRNGKey(0)))
  np.testing.assert_array_equal(again, outs[0])
  assert not np.array_equal(outs[0], outs[1])


def test_median_nn_distance_matches_brute_force():
  table = jax.random.normal(jax.random.PRNGKey(3), (N + 1, D))
  E = np.asarray(table, np.float64)[1:]
  d = np.linalg.norm(E[:, None] - E[None], axis=-1)
  np.fill_diagonal(d, np.inf)
  got = robustness.median_nn_distance(table, block_size=7)  # 25 = 3*7 + 4
  np.testing.assert_allclose(float(got), np.median(d.min(axis=1)), rtol=1e-5)


@pytest.fixture(scope="module")
def trained():
  """A small SASRec trained on the synthetic data, clearly above popularity."""
  from conftest import tiny_config
  config = tiny_config()
  ds = data_lib.load_from_config(config.data)
  arrays = data_lib.build_arrays(ds, config.data.max_len)
  data = train.device_data(arrays)
  N_, T_ = arrays.num_items, arrays.max_len
  model = models.build_model(config.model, N_, T_)
  opt = train.make_optimizer(config.train)
  # train.init_state, with the (slow, eager) Flax init jitted.
  params = jax.jit(model.init)(jax.random.PRNGKey(config.seed),
                               jnp.ones((1, T_), jnp.int32))
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=opt.init(params))
  # Built as a run builds it: the program of tiny_config's phase 1.
  from conftest import run_epoch
  epoch_fn, _ = run_epoch(model, opt, N_, batching.plan_from_table(
      data["train_inputs"], data["train_users"], config.train.batch_size),
                          adversarial.method_config("none"))
  uniform = (data["train_inputs"] > 0).astype(jnp.float32)
  epochs = 20  # epochs are ~30 ms here; compiling the epoch is the cost
  for e in range(epochs):
    state, _ = epoch_fn(state, data, uniform, jax.random.PRNGKey(e),
                        jax.random.PRNGKey(e))
  # Off the run's one-device mesh, on the device as the data.
  return model, jax.device_put(state.params, jax.devices()[0]), data, N_


def test_replacing_the_last_item_hurts_more_than_the_first(trained):
  model, params, data, num_items = trained
  pop = evaluate.evaluate_popularity(data, num_items, 100, (10,), "test")
  r = robustness.evaluate_robustness(
      model, params, data, num_items, positions=("first", "last"),
      last_k=(), batch_size=100)
  clean, attacks = r["clean"], r["attacks"]
  assert clean["ndcg@10"] > 1.5 * pop["ndcg@10"]  # the model has learned
  assert r["mode"] == "minimal" and r["alpha"] is None  # no step size
  assert set(attacks) == {"first", "last"}
  # Every test window has real items; one is replaced unless no allowed
  # item lies in the gradient direction from it (the original is extreme
  # along g: 8 of the 400 first items here, none of the last ones).
  assert attacks["last"]["replaced"] == 1
  assert 0.95 <= attacks["first"]["replaced"] <= 1
  for name in attacks:
    drop = (clean["ndcg@10"] - attacks[name]["ndcg@10"]) / clean["ndcg@10"]
    assert attacks[name]["ndcg@10_drop"] == pytest.approx(drop)
  # The paper's motivation (Fig. 5): the latest item matters most.
  first, last = attacks["first"]["ndcg@10_drop"], attacks["last"][
      "ndcg@10_drop"]
  assert last > first + 0.3, (first, last)
  assert attacks["last"]["hr@10_drop"] > attacks["first"]["hr@10_drop"]


def test_random_replacement_of_the_last_item_also_hurts_more(trained):
  model, params, data, num_items = trained
  with pytest.raises(ValueError, match="explicit rng"):
    robustness.evaluate_robustness(model, params, data, num_items,
                                   mode="random")
  r = robustness.evaluate_robustness(
      model, params, data, num_items, positions=("first", "last"),
      last_k=(3,), mode="random", batch_size=100, rng=jax.random.PRNGKey(0))
  attacks = r["attacks"]
  assert set(attacks) == {"first", "last", "last_3"}
  # Synthetic users have >= 5 items, so test windows have >= 4 real ones.
  assert attacks["last_3"]["replaced"] == 3
  assert attacks["last"]["ndcg@10_drop"] > (
      attacks["first"]["ndcg@10_drop"] + 0.3)


def test_bucketed_attack_equals_the_full_window_attack(trained):
  """Length buckets change nothing for the deterministic attacks."""
  model, params, data, num_items = trained
  lens = np.sum(np.asarray(data["test_inputs"]) > 0, axis=1)
  plan = batching.eval_plan(lens, (6, 12))
  assert plan.lengths == (6, 12)  # every bucket has rows
  # K = 8 > 6: the shortest bucket's windows are attacked at K = 6.
  kw = dict(positions=("middle",), last_k=(8,), batch_size=100)
  full = robustness.evaluate_robustness(model, params, data, num_items, **kw)
  part = robustness.evaluate_robustness(model, params, data, num_items,
                                        plan=plan, **kw)
  assert part == full
  # Anchor 'window': the middle slot (T - 1) // 2 of the 12-wide window,
  # attacked only in the windows where it holds a real item.
  kw = dict(positions=("middle",), last_k=(), batch_size=100,
            anchor="window")
  full = robustness.evaluate_robustness(model, params, data, num_items, **kw)
  part = robustness.evaluate_robustness(model, params, data, num_items,
                                        plan=plan, **kw)
  assert part == full and full["anchor"] == "window"
  slot = (data["test_inputs"].shape[1] - 1) // 2
  real = np.asarray(data["test_inputs"])[:, slot] > 0
  assert 0 < real.mean() < 1  # some windows are too short to be attacked
  # Each window with a real item there loses it (the gradient rule finds a
  # replacement for all but a few), none of the others changes.
  assert 0.9 * real.mean() <= full["attacks"]["middle"]["replaced"] \
      <= real.mean()
  with pytest.raises(ValueError, match="Unknown anchor"):
    robustness.evaluate_robustness(model, params, data, num_items,
                                   **{**kw, "anchor": "slot"})


def test_cosine_mode_is_nearness_in_angle_not_distance():
  table = np.array([
      [0.0, 0.0],    # 0 padding
      [1.0, 1.0],    # 1 the window's item e; the gradient points along +x
      [-1.0, 0.0],   # 2 the target
      [1.3, 1.0],    # 3 nearest to e in L2, 0.99 cosine
      [3.0, 2.9],    # 4 far, but 0.9999 cosine
      [0.5, 0.5]])   # 5 cosine 1, but E_5 - e points against the gradient
  n = len(table) - 1

  def attack(mode):
    windows = jnp.asarray([[0, 0, 1]], jnp.int32)
    pos, valid = robustness.attack_positions(windows, "last", 1)
    return np.asarray(robustness.attack_batch(
        SumModel(table), None, windows, jnp.asarray([2], jnp.int32),
        jnp.full((1, 1), n + 1, jnp.int32), jnp.zeros(1, jnp.int32), pos,
        valid, 0.0, jax.random.PRNGKey(0), n, mode=mode))[0]

  np.testing.assert_array_equal(attack("minimal"), [0, 0, 3])
  np.testing.assert_array_equal(attack("cosine"), [0, 0, 4])


def test_replacement_stats_against_a_loop():
  rng = np.random.default_rng(3)
  train_inputs = rng.integers(0, 8, size=(6, 5))
  counts = robustness.item_counts(train_inputs, 9)
  for j in range(10):
    assert counts[j] == (0 if j == 0 else int(np.sum(train_inputs == j)))
  norms = rng.uniform(0.5, 2.0, size=10)
  old, new = np.array([1, 2, 2, 5]), np.array([3, 9, 4, 6])
  s = robustness.replacement_stats(norms, counts, old, new)
  assert s["norm_ratio"] == pytest.approx(
      np.median([norms[b] / norms[a] for a, b in zip(old, new)]))
  assert s["count_original"] == np.median([counts[a] for a in old])
  assert s["count_replacement"] == np.median([counts[b] for b in new])
  assert np.isnan(robustness.replacement_stats(
      norms, counts, old[:0], new[:0])["norm_ratio"])
