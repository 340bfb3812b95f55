import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cat_jax import adversarial, data, losses, train
from cat_jax import batching, cascade, models

B, T, D, N = 4, 6, 8, 20


def toy_encoder(params, S, mask):
  """Causal mean pooling then a dense layer: not part of the package."""
  m = mask[..., None].astype(S.dtype)
  csum = jnp.cumsum(S * m, axis=1)
  count = jnp.maximum(jnp.cumsum(m, axis=1), 1.0)
  return jnp.tanh((csum / count) @ params["w"]) * m


def toy_problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(D, D)), jnp.float32),
            "E": jnp.asarray(rng.normal(size=(N + 1, D)), jnp.float32)}
  ids = rng.integers(1, N + 1, (B, T))
  ids[0, :2] = 0  # some padding
  ids = jnp.asarray(ids, jnp.int32)
  targets = jnp.asarray(rng.integers(1, N + 1, (B, T)), jnp.int32)
  negs = jnp.asarray(rng.integers(1, N + 1, (B, T)), jnp.int32)
  mask = ids > 0
  weights = mask.astype(jnp.float32)
  pert = jnp.asarray(rng.uniform(0.5, 2.0, (B, T)), jnp.float32) * weights
  return params, ids, targets, negs, mask, weights, pert


def toy_terms(params, ids, targets, negs, mask, weights, pert, cfg, key):
  S = params["E"][ids]
  encode = lambda s: toy_encoder(params, s, mask)
  return adversarial.adv_step(encode, S, params["E"][targets],
                              params["E"][negs], weights, pert, key, cfg)


@pytest.mark.parametrize("method", ["linear", "seq", "global", "cas"])
def test_eps_zero_gives_the_base_loss(method):
  p, ids, tg, ng, mask, w, pert = toy_problem()
  cfg = adversarial.method_config(method, eps=0.0)
  terms = toy_terms(p, ids, tg, ng, mask, w, pert, cfg, jax.random.PRNGKey(0))
  base = float(terms["bce"])
  if cfg.level1 == "distance":
    assert float(terms["adv1"]) == 0.0
  if cfg.level1 == "bce":
    assert float(terms["adv1"]) == pytest.approx(base, rel=1e-6)
  if cfg.level2:
    assert float(terms["adv2"]) == pytest.approx(base, rel=1e-6)


def test_perturbation_norms_equal_eps_times_weights():
  rng = np.random.default_rng(0)
  g = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  A = adversarial.sequence_perturbation(g, 3.0)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(A).reshape(B, -1),
                                            axis=1), 3.0, rtol=1e-5)
  d = adversarial.row_perturbation(g, 2.5)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(d), axis=-1), 2.5,
                             rtol=1e-5)
  # A zero gradient gives a zero perturbation, not NaN.
  z = adversarial.row_perturbation(jnp.zeros((2, D)), 1.0)
  np.testing.assert_array_equal(np.asarray(z), 0.0)
  # Budget 'mean': the applied level-1 perturbation of position t is
  # w_t * A_t with ||A|| = eps per sequence (over its real positions).
  p, ids, tg, ng, mask, w, pert = toy_problem()
  S = p["E"][ids]
  cfg = adversarial.method_config("cas", eps=3.0, budget="mean")
  encode = lambda s: toy_encoder(p, s, mask)
  _, delta = adversarial.level1_distance(encode, S, encode(S), pert, w,
                                         jax.random.PRNGKey(1), cfg)
  pw = np.asarray(pert)[..., None]
  A = np.where(pw > 0, np.asarray(delta) / np.where(pw > 0, pw, 1.0), 0.0)
  np.testing.assert_allclose(np.linalg.norm(A.reshape(B, -1), axis=1), 3.0,
                             rtol=1e-5)
  assert (np.asarray(delta)[~np.asarray(mask)] == 0).all()


def test_relative_eps_scales_with_the_perturbed_norm():
  rng = np.random.default_rng(1)
  g = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(B, T, D)) * 3.0, jnp.float32)
  A = adversarial.sequence_perturbation(g, 0.2, ref=x)
  np.testing.assert_allclose(
      np.linalg.norm(np.asarray(A).reshape(B, -1), axis=1),
      0.2 * np.linalg.norm(np.asarray(x).reshape(B, -1), axis=1), rtol=1e-5)
  d = adversarial.row_perturbation(g, 0.5, ref=x)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(d), axis=-1),
                             0.5 * np.linalg.norm(np.asarray(x), axis=-1),
                             rtol=1e-5)
  # Through adv_step: the level-2 pushes are eps * ||W|| and eps * ||E||.
  p, ids, tg, ng, mask, w, pert = toy_problem()
  cfg = adversarial.method_config("cas", eps=0.3, relative=True)
  W = toy_encoder(p, p["E"][ids], mask)
  _, (dW, dp, _) = adversarial.level2(W, p["E"][tg], p["E"][ng], w, cfg)
  nz = np.linalg.norm(np.asarray(dW), axis=-1) > 0
  np.testing.assert_allclose(np.linalg.norm(np.asarray(dW), axis=-1)[nz],
                             0.3 * np.linalg.norm(np.asarray(W), axis=-1)[nz],
                             rtol=1e-5)
  # (Steps with weight 0 have a zero gradient and get no push.)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(dp), axis=-1)[nz],
                             0.3 * np.linalg.norm(np.asarray(p["E"][tg]),
                                                  axis=-1)[nz], rtol=1e-5)
  assert nz.sum() == int(np.asarray(w).sum())


def test_level1_search_beats_a_random_direction():
  p, ids, tg, ng, mask, w, pert = toy_problem(3)
  S = p["E"][ids]
  encode = lambda s: toy_encoder(p, s, mask)
  W = encode(S)
  cfg = adversarial.method_config("global", eps=0.5)
  found, _ = adversarial.level1_distance(encode, S, W, w, w,
                                         jax.random.PRNGKey(0), cfg)
  rand = []
  for seed in range(20):
    r = jax.random.normal(jax.random.PRNGKey(100 + seed), S.shape)
    r = adversarial.budgeted_perturbation(r, w, 0.5, cfg)
    rand.append(float(adversarial.embedding_distance(encode, S, W, r, w)))
  assert float(found) > 2.0 * np.mean(rand)
  assert float(found) > max(rand)


@pytest.mark.parametrize("method", ["linear", "seq", "global", "cas"])
def test_no_gradient_flows_through_the_perturbations(method):
  """d(total)/d(params) equals the gradient with the perturbations frozen."""
  p, ids, tg, ng, mask, w, pert = toy_problem(1)
  cfg = adversarial.method_config(method, eps=0.7)
  key = jax.random.PRNGKey(5)

  def total(params):
    return toy_terms(params, ids, tg, ng, mask, w, pert, cfg, key)["loss"]

  # Freeze the perturbations at their values for the current params.
  S, E = p["E"][ids], p["E"]
  encode = lambda s: toy_encoder(p, s, mask)
  W = encode(S)
  if cfg.level1 == "distance":
    _, delta = adversarial.level1_distance(encode, S, W, pert, w, key, cfg)
  elif cfg.level1 == "bce":
    _, delta = adversarial.level1_bce(encode, S, E[tg], E[ng], pert, w, cfg)
  if cfg.level2:
    _, (dW, dp, dn) = adversarial.level2(W, E[tg], E[ng], w, cfg)

  def frozen(params):
    S = params["E"][ids]
    pos, neg = params["E"][tg], params["E"][ng]
    enc = lambda s: toy_encoder(params, s, mask)
    W = enc(S)
    out = losses.bce_loss(W, pos, neg, w)
    if cfg.level1 == "distance":
      out += adversarial.embedding_distance(enc, S, W, delta, w)
    elif cfg.level1 == "bce":
      out += losses.bce_loss(enc(S + delta), pos, neg, w)
    if cfg.level2:
      out += losses.bce_loss(W + dW, pos + dp, neg + dn, w)
    return out

  np.testing.assert_allclose(float(total(p)), float(frozen(p)), rtol=1e-6)
  g1, g2 = jax.grad(total)(p), jax.grad(frozen)(p)
  for k in p:
    np.testing.assert_allclose(np.asarray(g1[k]), np.asarray(g2[k]),
                               rtol=1e-4, atol=1e-6)


def test_adv_step_is_reusable_with_a_foreign_encoder():
  """Other JAX code plugs its own encoder in and differentiates through."""
  p, ids, tg, ng, mask, w, pert = toy_problem(2)
  cfg = adversarial.method_config("cas", eps=0.5)

  @jax.jit
  def loss(params):
    t = toy_terms(params, ids, tg, ng, mask, w, pert, cfg,
                  jax.random.PRNGKey(0))
    return t["loss"], t

  (value, terms), grads = jax.value_and_grad(loss, has_aux=True)(p)
  chex.assert_tree_all_finite((value, grads))
  assert float(terms["adv1"]) > 0 and float(terms["adv2"]) > float(
      terms["bce"])
  assert float(jnp.abs(grads["w"]).sum()) > 0


@pytest.mark.parametrize("bad,match", [
    (dict(method="fgsm"), "Unknown adv.method 'fgsm'"),
    (dict(method="cas", eps=-1.0), "adv.eps must be >= 0"),
    (dict(method="cas", lambda1=-0.1), "adv.lambda1 must be >= 0"),
    (dict(method="cas", lambda2=float("nan")), "adv.lambda2 must be >= 0"),
    (dict(method="cas", direction="grad"), "Unknown adv.direction 'grad'"),
    (dict(method="cas", budget="sum"), "Unknown adv.budget 'sum'"),
    (dict(method="cas", magnitude="per_user"),
     "Unknown adv.magnitude 'per_user'"),
])
def test_bad_settings_are_clear_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    adversarial.method_config(**bad)


def test_method_table():
  get = adversarial.method_config
  assert (get("none").level1, get("none").level2) == ("none", False)
  assert (get("linear").level1, get("linear").level2) == ("none", True)
  assert (get("seq").level1, get("seq").level2) == ("bce", False)
  for m in ("global", "cas", "cas_temporal", "cas_cross"):
    assert (get(m).level1, get(m).level2) == ("distance", True)


# global and the cascade ablations share cas's code path (only the level-1
# weights differ, and those are tested in test_cascade.py); compiling each
# costs ~10 s of the suite's budget. The epochs are built as a run builds
# them (conftest.run_epoch): all but seq's are then the programs of the
# tiny runs of other tests, compiled once per session.
@pytest.mark.parametrize("model_name,method", [
    ("sasrec", m) for m in ("none", "linear", "seq", "cas")] + [
        ("gru4rec", "cas")])
def test_every_method_trains_under_jit(make_config, method, model_name):
  from conftest import run_epoch
  config = make_config(**{"model.name": model_name})
  ds = data.load_from_config(config.data)
  arrays = data.build_arrays(ds, config.data.max_len)
  dd = train.device_data(arrays)
  model = models.build_model(config.model, arrays.num_items, arrays.max_len)
  opt = train.make_optimizer(config.train)
  state = train.init_state(model, opt, jax.random.PRNGKey(0), arrays.max_len)
  before = jax.tree.map(np.asarray, state.params)
  cfg = adversarial.method_config(method, eps=1.0)
  epoch, steps = run_epoch(
      model, opt, arrays.num_items,
      batching.plan_from_table(arrays.train_inputs, arrays.train_users, 64),
      cfg)
  pert = cascade.weights_for_method(dd["train_inputs"], 64, method)
  state, terms = epoch(state, dd, pert, jax.random.PRNGKey(1),
                       jax.random.PRNGKey(1))
  assert int(state.step) == steps
  chex.assert_tree_all_finite(terms)
  assert np.asarray(terms["loss"]).shape == (steps,)
  if cfg.level1 != "none":
    assert np.all(np.asarray(terms["adv1"]) > 0)
  if cfg.level2:
    assert np.all(np.asarray(terms["adv2"]) > 0)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, np.asarray(b)),
                         before, state.params)
  assert all(jax.tree.leaves(changed))


# --- Level 1 (issue 12): direction, budget, padding ------------------------


def np_toy_encoder(params, X, mask):
  """`toy_encoder` in float64 numpy, for brute-force gradients."""
  w = np.asarray(params["w"], np.float64)
  m = np.asarray(mask, np.float64)[..., None]
  csum = np.cumsum(X * m, axis=1)
  count = np.maximum(np.cumsum(m, axis=1), 1.0)
  return np.tanh((csum / count) @ w) * m


def fd_gradient(f, x, h=1e-6):
  """Central finite differences of a scalar f at x (float64, any shape)."""
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    e = np.zeros_like(x)
    e[i] = h
    g[i] = (f(x + e) - f(x - e)) / (2 * h)
  return g


def dataset_problem(seed=0, m=30):
  """Toy params and a batch of B rows of a small data set of windows, with
  the level-1 weights of `cas` computed over the whole data set (mean 1)."""
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(D, D)), jnp.float32),
            "E": jnp.asarray(rng.normal(size=(N + 1, D)), jnp.float32)}
  seqs = np.zeros((m, T), np.int32)
  for i in range(m):
    n = [T, 2, 4, 1][i] if i < 4 else rng.integers(1, T + 1)
    seqs[i, T - n:] = rng.integers(1, N + 1, n)
  table = np.asarray(cascade.weights_for_method(jnp.asarray(seqs), 8, "cas"))
  assert table[seqs > 0].mean() == pytest.approx(1.0, rel=1e-5)
  ids = jnp.asarray(seqs[:B])
  mask = ids > 0
  return params, ids, mask, mask.astype(jnp.float32), jnp.asarray(table[:B])


def brute_force_delta(grad, pert, eps, budget, axes=(1, 2)):
  """Eq. 4.6/4.7 by hand: the budget rules of the issue, in numpy."""
  w = np.asarray(pert, np.float64)[..., None]
  norm = lambda x: np.sqrt(np.sum(x * x, axis=axes, keepdims=True))
  if budget == "equal":
    return eps * (w * grad) / norm(w * grad)
  return w * eps * grad / norm(grad)


@pytest.mark.parametrize("budget,direction", [
    ("equal", "input"), ("mean", "input"), ("equal", "weighted"),
    ("mean", "weighted")])
def test_level1_direction_matches_finite_differences(budget, direction):
  """delta against a finite-difference gradient of L_adv1 on a small encoder.

  'input': g = dL_adv1/dX at X = S + delta_0 (Eq. 4.7). 'weighted' (the
  code before issue 12): g_A = dL_adv1(S + w * A)/dA at the same point.
  Budget 'mean' applies w * eps g/||g|| with the data set's mean-1 weights.
  """
  p, ids, mask, w, pert = dataset_problem(4)
  S = p["E"][ids]
  eps, key = 1.5, jax.random.PRNGKey(3)
  cfg = adversarial.method_config("cas", eps=eps, xi=0.05, budget=budget,
                                  direction=direction)
  encode = lambda s: toy_encoder(p, s, mask)
  delta = np.asarray(adversarial.level1_perturbation(encode, S, pert, key,
                                                     cfg, weights=w))
  start = np.asarray(adversarial.level1_start(key, pert, S.shape, cfg),
                     np.float64)
  S64, m = np.asarray(S, np.float64), np.asarray(mask)
  W0 = np_toy_encoder(p, S64, m)
  wts = np.asarray(w, np.float64)

  def loss(X):
    dist = np.linalg.norm(np_toy_encoder(p, X, m) - W0, axis=-1)
    return np.sum(dist * wts) / max(wts.sum(), 1.0)

  pw = np.asarray(pert, np.float64)[..., None]
  if direction == "input":
    g = fd_gradient(loss, S64 + start)
  else:  # differentiate with respect to A in S + w * A, at w * A = delta_0
    A0 = np.where(pw > 0, start / np.where(pw > 0, pw, 1.0), 0.0)
    g = fd_gradient(lambda a: loss(S64 + pw * a), A0)
  want = brute_force_delta(g, pert, eps, budget)
  np.testing.assert_allclose(delta, want, rtol=2e-3, atol=2e-5)
  assert (delta[~m] == 0).all()
  if budget == "mean":  # cas spends more or less than eps per sequence
    norms = np.linalg.norm(delta.reshape(B, -1), axis=1)
    assert np.ptp(norms) > 0.1


def toy_batch_terms(p, ids, pert, cfg, key=jax.random.PRNGKey(0)):
  mask = ids > 0
  S = p["E"][ids]
  encode = lambda s: toy_encoder(p, s, mask)
  return adversarial.level1_perturbation(
      encode, S, pert, key, cfg, weights=mask.astype(jnp.float32),
      pos=p["E"][(ids % N) + 1], neg=p["E"][((ids + 7) % N) + 1])


@pytest.mark.parametrize("scope", ["row", "batch"])
@pytest.mark.parametrize("relative", [False, True])
def test_equal_budget_spends_what_global_spends(scope, relative):
  """Budget 'equal': every method's ||delta|| is global's, per sequence
  (scope row) or in total (scope batch), over the real positions."""
  p, ids, mask, w, _ = dataset_problem(1)
  seqs = np.asarray(dataset_problem(1)[1])
  m = np.asarray(mask)
  S = np.asarray(p["E"][ids], np.float64)
  eps = 0.7
  axes = (1, 2) if scope == "row" else (0, 1, 2)
  # The size global spends, by hand: eps (or eps * ||real part of S||).
  size = eps * (np.sqrt(np.sum(np.where(m[..., None], S, 0.0) ** 2, axis=axes))
                if relative else 1.0)
  norms = {}
  for method in ("global", "cas", "cas_temporal", "cas_cross", "seq"):
    pert = cascade.weights_for_method(jnp.asarray(seqs), 8, method)
    cfg = adversarial.method_config(method, eps=eps, scope=scope,
                                    relative=relative)
    delta = np.asarray(toy_batch_terms(p, ids, pert, cfg), np.float64)
    assert (delta[~m] == 0).all()
    norms[method] = np.sqrt(np.sum(delta ** 2, axis=axes))
    np.testing.assert_allclose(norms[method], size, rtol=1e-5)
    if method == "cas":
      cas_delta = delta
    if method == "global":
      global_delta = delta
  # The weights moved the budget between positions (same total).
  assert not np.allclose(np.linalg.norm(cas_delta, axis=-1),
                         np.linalg.norm(global_delta, axis=-1), rtol=1e-2)
  # Budget 'mean' does not spend the same (issue 12's 2.2x).
  pert = cascade.weights_for_method(jnp.asarray(seqs), 8, "cas")
  cfg = adversarial.method_config("cas", eps=eps, scope=scope,
                                  relative=relative, budget="mean")
  delta = np.asarray(toy_batch_terms(p, ids, pert, cfg), np.float64)
  assert not np.allclose(np.sqrt(np.sum(delta ** 2, axis=axes)), size,
                         rtol=1e-2)


@pytest.mark.parametrize("budget", ["equal", "mean"])
@pytest.mark.parametrize("direction", ["input", "weighted"])
def test_cas_with_equal_cascade_scores_is_global(budget, direction):
  p, ids, mask, w, _ = dataset_problem(2)
  C = jnp.where(mask, 5.0, 0.0)  # every cascade score the same
  pert = cascade.perturbation_weights(C, mask)
  if budget == "equal":  # any constant works: only ratios in a row count
    pert = 0.37 * pert
  get = lambda m, w: toy_batch_terms(
      p, ids, w, adversarial.method_config(m, eps=1.3, budget=budget,
                                           direction=direction))
  np.testing.assert_allclose(np.asarray(get("cas", pert)),
                             np.asarray(get("global", w)), rtol=1e-5,
                             atol=1e-7)
  # The same through adv_step (both levels, every loss term).
  tg = jnp.asarray(np.random.default_rng(0).integers(1, N + 1, (B, T)))
  terms = [adversarial.adv_step(
      lambda s: toy_encoder(p, s, mask), p["E"][ids], p["E"][tg],
      p["E"][(tg % N) + 1], w, weights, jax.random.PRNGKey(7),
      adversarial.method_config(m, eps=1.3, budget=budget,
                                direction=direction))
           for m, weights in (("cas", pert), ("global", w))]
  for k in terms[0]:
    assert float(terms[0][k]) == pytest.approx(float(terms[1][k]), rel=1e-5)


@pytest.mark.parametrize("cfg_kw", [
    dict(method="cas"), dict(method="cas", budget="mean", direction="weighted"),
    dict(method="cas", relative=True), dict(method="cas", scope="batch"),
    dict(method="seq"), dict(method="seq", relative=True)])
def test_left_padding_does_not_change_the_perturbation(cfg_kw):
  """The same sequences with 3 more columns of left padding (as a longer
  length bucket runs them) get the same delta on their items, same rng."""
  p, ids, mask, w, pert = dataset_problem(3)
  extra = 3
  long_ids = jnp.pad(ids, ((0, 0), (extra, 0)))
  long_pert = jnp.pad(pert, ((0, 0), (extra, 0)))
  cfg = adversarial.method_config(eps=0.9, xi=0.05, **cfg_kw)
  key = jax.random.PRNGKey(11)
  short = np.asarray(toy_batch_terms(p, ids, pert, cfg, key))
  long = np.asarray(toy_batch_terms(p, long_ids, long_pert, cfg, key))
  # (The padding embedding E[0] is not zero here: relative sizes and norms
  # must not see it.)
  assert np.linalg.norm(np.asarray(p["E"][0])) > 0.1
  np.testing.assert_array_equal(long[:, :extra], 0.0)
  np.testing.assert_allclose(long[:, extra:], short, rtol=1e-4, atol=1e-6)
  # The random start alone, too.
  s0 = adversarial.level1_start(key, pert, (B, T, D), cfg)
  s1 = adversarial.level1_start(key, long_pert, (B, T + extra, D), cfg)
  np.testing.assert_allclose(np.asarray(s1)[:, extra:], np.asarray(s0),
                             rtol=1e-5, atol=1e-8)
  # ... which is xi per sequence on its real positions (budget equal).
  if cfg.budget == "equal" and cfg.scope == "row":
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(s0).reshape(B, -1), axis=1), 0.05,
        rtol=1e-5)


@pytest.mark.parametrize("direction,budget,scope", [
    ("weighted", "mean", "row"), ("input", "mean", "batch"),
    ("weighted", "equal", "batch")])  # (input, equal, row): the test above
def test_level1_options_differentiate_under_jit(direction, budget, scope):
  p, ids, tg, ng, mask, w, pert = toy_problem(2)
  cfg = adversarial.method_config("cas", eps=0.5, direction=direction,
                                  budget=budget, scope=scope)

  @jax.jit
  def loss(params):
    t = toy_terms(params, ids, tg, ng, mask, w, pert, cfg,
                  jax.random.PRNGKey(0))
    return t["loss"], t

  (value, terms), grads = jax.value_and_grad(loss, has_aux=True)(p)
  chex.assert_tree_all_finite((value, grads))
  assert float(terms["adv1"]) > 0


def test_train_adv_config_passes_the_level1_knobs(make_config):
  cfg = train.adv_config(make_config())
  assert (cfg.direction, cfg.budget) == ("input", "equal")
  cfg = train.adv_config(make_config(**{"adv.direction": "weighted",
                                        "adv.budget": "mean"}))
  assert (cfg.direction, cfg.budget) == ("weighted", "mean")


# --- Per-user magnitude (issue 14, PamaCF) ---------------------------------


def brute_force_factors(W, weights):
  """c_bt = sigmoid(||W_bt|| - mean over real positions of ||W||), by loops."""
  W, weights = np.asarray(W, np.float64), np.asarray(weights)
  Bw, Tw = weights.shape
  norms = [[float(np.sqrt(sum(x * x for x in W[b, t]))) for t in range(Tw)]
           for b in range(Bw)]
  real = [norms[b][t] for b in range(Bw) for t in range(Tw)
          if weights[b, t] > 0]
  mean = sum(real) / len(real)
  return np.array([[1.0 / (1.0 + np.exp(-(norms[b][t] - mean)))
                    for t in range(Tw)] for b in range(Bw)])


def magnitude_problem(seed=5):
  """Toy batch whose encoder outputs have clearly different norms per row."""
  p, ids, tg, ng, mask, w, pert = toy_problem(seed)
  scale = jnp.asarray([0.3, 1.0, 2.5, 4.0], jnp.float32)[:, None, None]
  encode = lambda s: scale * toy_encoder(p, s, mask)
  return p, ids, tg, ng, mask, w, pert, encode


@pytest.mark.parametrize("scope", ["row", "batch"])
def test_pamacf_level2_matches_brute_force(scope):
  """Level 2: W, E_pos, E_neg at (b, t) move by eps * c_bt along the
  direction 'uniform' takes, c from a loop over the positions."""
  p, ids, tg, ng, mask, w, pert, encode = magnitude_problem()
  W = encode(p["E"][ids])
  pos, neg = p["E"][tg], p["E"][ng]
  c = brute_force_factors(W, w)
  np.testing.assert_allclose(np.asarray(adversarial.magnitude_factors(W, w)),
                             c, rtol=1e-5)
  assert np.ptp(c[np.asarray(mask)]) > 0.3  # the factors differ
  eps = 0.8
  _, uni = adversarial.level2(W, pos, neg, w, adversarial.method_config(
      "linear", eps=eps, scope=scope))
  adv2, pam = adversarial.level2(W, pos, neg, w, adversarial.method_config(
      "linear", eps=eps, scope=scope, magnitude="pamacf"))
  for u, d in zip(uni, pam):
    np.testing.assert_allclose(np.asarray(d), c[..., None] * np.asarray(u),
                               rtol=1e-5, atol=1e-7)
  if scope == "row":  # each real position's W moves by exactly eps * c_bt
    m = np.asarray(mask)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(pam[0]), axis=-1)[m],
                               eps * c[m], rtol=1e-5)
  want = losses.bce_loss(W + pam[0], pos + pam[1], neg + pam[2], w)
  assert float(adv2) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("cfg_kw", [
    dict(method="cas"), dict(method="cas", budget="mean"),
    dict(method="global", relative=True), dict(method="seq"),
    dict(method="cas", scope="batch")])
def test_pamacf_level1_matches_brute_force(cfg_kw):
  """Level 1: sequence b's perturbation is c_b times uniform's, c_b the mean
  of the loop's c_bt over its real positions."""
  p, ids, tg, ng, mask, w, pert, encode = magnitude_problem(6)
  S = p["E"][ids]
  c = brute_force_factors(encode(S), w)
  m = np.asarray(mask)
  c_seq = np.array([c[b][m[b]].mean() for b in range(B)])
  key = jax.random.PRNGKey(2)
  get = lambda **kw: np.asarray(adversarial.level1_perturbation(
      encode, S, pert, key, adversarial.method_config(eps=0.9, **cfg_kw, **kw),
      weights=w, pos=p["E"][tg], neg=p["E"][ng]))
  uni, pam = get(), get(magnitude="pamacf")
  assert np.abs(uni).sum() > 0
  np.testing.assert_allclose(pam, c_seq[:, None, None] * uni, rtol=1e-4,
                             atol=1e-7)
  # The same through adv_step, which hands its W over (no second pass).
  np.testing.assert_allclose(
      np.asarray(adversarial.sequence_factors(encode(S), w)), c_seq,
      rtol=1e-5)


@pytest.mark.parametrize("method", ["linear", "seq", "global", "cas"])
def test_uniform_magnitude_is_the_default_bit_for_bit(method):
  p, ids, tg, ng, mask, w, pert = toy_problem(3)
  key = jax.random.PRNGKey(4)
  default = adversarial.method_config(method, eps=0.7)
  uniform = adversarial.method_config(method, eps=0.7, magnitude="uniform")
  assert default.magnitude == "uniform" == adversarial.AdvConfig().magnitude
  a = toy_terms(p, ids, tg, ng, mask, w, pert, default, key)
  b = toy_terms(p, ids, tg, ng, mask, w, pert, uniform, key)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
  S, encode = p["E"][ids], lambda s: toy_encoder(p, s, mask)
  d = [np.asarray(adversarial.level1_perturbation(
      encode, S, pert, key, cfg, weights=w, pos=p["E"][tg], neg=p["E"][ng]))
       for cfg in (default, uniform)]
  np.testing.assert_array_equal(d[0], d[1])
  # ... and pamacf differs (the comparison can fail).
  pam = toy_terms(p, ids, tg, ng, mask, w, pert,
                  uniform._replace(magnitude="pamacf"), key)
  assert float(pam["loss"]) != float(a["loss"])


def test_pamacf_with_equal_norms_is_half_eps():
  """All ||W|| equal: every factor is sigmoid(0) = 1/2, so pamacf at eps
  is uniform at eps / 2 on both levels."""
  p, ids, tg, ng, mask, w, pert = toy_problem(4)
  m = mask[..., None]
  encode = lambda s: 3.0 * adversarial.l2_normalize(
      toy_encoder(p, s, mask) + 0.01, -1) * m
  S = p["E"][ids]
  W = encode(S)
  np.testing.assert_allclose(np.asarray(adversarial.magnitude_factors(W, w))[
      np.asarray(mask)], 0.5, rtol=1e-6)
  key = jax.random.PRNGKey(8)
  get = lambda method, eps, mag: adversarial.adv_step(
      encode, S, p["E"][tg], p["E"][ng], w, pert, key,
      adversarial.method_config(method, eps=eps, magnitude=mag))
  for method in ("cas", "linear", "seq"):
    a, b = get(method, 1.2, "pamacf"), get(method, 0.6, "uniform")
    for k in a:
      assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-5), (method, k)
  d = [np.asarray(adversarial.level1_perturbation(
      encode, S, pert, key, adversarial.method_config(
          "cas", eps=e, magnitude=mag), weights=w))
       for e, mag in ((1.2, "pamacf"), (0.6, "uniform"))]
  np.testing.assert_allclose(d[0], d[1], rtol=1e-5, atol=1e-7)


def test_pamacf_differentiates_under_jit():
  """pamacf's loss and gradients under jit for every level-1 kind (the real
  train step, cas + pamacf through the runner, is trained in
  tests/test_poisoning.py::test_runner_end_to_end)."""
  p, ids, tg, ng, mask, w, pert = toy_problem(2)

  def make_loss(cfg):
    def loss(q):
      t = toy_terms(q, ids, tg, ng, mask, w, pert, cfg, jax.random.PRNGKey(0))
      return t["loss"], t
    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  for method in ("seq", "linear", "cas"):
    c = adversarial.method_config(method, eps=0.5, magnitude="pamacf")
    (value, terms), grads = make_loss(c)(p)
    chex.assert_tree_all_finite((value, grads))
    assert float(jnp.abs(grads["w"]).sum()) > 0
    assert float(terms["adv1"] + terms["adv2"]) > 0


def test_train_adv_config_passes_the_magnitude(make_config):
  assert train.adv_config(make_config()).magnitude == "uniform"
  assert train.adv_config(make_config(
      **{"adv.magnitude": "pamacf"})).magnitude == "pamacf"
  with pytest.raises(ValueError, match="Unknown adv.magnitude 'x'"):
    train.adv_config(make_config(**{"adv.magnitude": "x"}))


# --- The weights of Eq. 4.10 -----------------------------------------------


def test_lambda1_weighs_adv1_and_lambda2_weighs_adv2(make_config):
  """loss = bce + lambda1 * adv1 + lambda2 * adv2 with lambda1 != lambda2
  (equal lambdas, the default, would hide a swap), from the config on."""
  p, ids, tg, ng, mask, w, pert = toy_problem(3)
  key = jax.random.PRNGKey(7)
  cfg = train.adv_config(make_config(**{"adv.method": "cas", "adv.eps": 0.5,
                                        "adv.lambda1": 0.25,
                                        "adv.lambda2": 3.0}))
  assert (cfg.lambda1, cfg.lambda2) == (0.25, 3.0)
  # The lambdas as runtime inputs, as a train epoch takes them (one program
  # for both calls).
  get = jax.jit(lambda hp: toy_terms(p, ids, tg, ng, mask, w, pert,
                                     cfg.with_hyperparams(hp), key))
  terms = get(cfg.hyperparams())
  # The terms themselves do not depend on the lambdas.
  unit = get({**cfg.hyperparams(), "lambda1": 1.0, "lambda2": 1.0})
  for k in ("bce", "adv1", "adv2"):
    assert float(terms[k]) == pytest.approx(float(unit[k]), rel=1e-6)
  bce, adv1, adv2 = (float(terms[k]) for k in ("bce", "adv1", "adv2"))
  assert adv1 > 0 and abs(adv1 - adv2) > 0.1  # a swap shows
  assert float(terms["loss"]) == pytest.approx(
      bce + 0.25 * adv1 + 3.0 * adv2, rel=1e-6)
