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
  # The applied level-1 perturbation of position t is w_t * A_t.
  p, ids, tg, ng, mask, w, pert = toy_problem()
  S = p["E"][ids]
  cfg = adversarial.method_config("cas", eps=3.0)
  encode = lambda s: toy_encoder(p, s, mask)
  _, A = adversarial.level1_distance(encode, S, encode(S), pert, w,
                                     jax.random.PRNGKey(1), cfg)
  np.testing.assert_allclose(
      np.linalg.norm(np.asarray(A).reshape(B, -1), axis=1), 3.0, rtol=1e-5)
  applied = np.asarray(pert)[..., None] * np.asarray(A)
  row = np.linalg.norm(applied, axis=-1)
  np.testing.assert_allclose(row, np.asarray(pert) * np.linalg.norm(
      np.asarray(A), axis=-1), rtol=1e-5)


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
  found, A = adversarial.level1_distance(encode, S, W, w, w,
                                         jax.random.PRNGKey(0), cfg)
  rand = []
  for seed in range(20):
    r = jax.random.normal(jax.random.PRNGKey(100 + seed), S.shape)
    r = adversarial.sequence_perturbation(r, 0.5)
    rand.append(float(adversarial.embedding_distance(encode, S, W, r, w, w)))
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
    _, A = adversarial.level1_distance(encode, S, W, pert, w, key, cfg)
  elif cfg.level1 == "bce":
    _, A = adversarial.level1_bce(encode, S, E[tg], E[ng], pert, w, cfg)
  if cfg.level2:
    _, (dW, dp, dn) = adversarial.level2(W, E[tg], E[ng], w, cfg)

  def frozen(params):
    S = params["E"][ids]
    pos, neg = params["E"][tg], params["E"][ng]
    enc = lambda s: toy_encoder(params, s, mask)
    W = enc(S)
    out = losses.bce_loss(W, pos, neg, w)
    if cfg.level1 == "distance":
      out += adversarial.embedding_distance(enc, S, W, A, pert, w)
    elif cfg.level1 == "bce":
      out += losses.bce_loss(enc(S + pert[..., None] * A), pos, neg, w)
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


@pytest.mark.parametrize("model_name,method", [
    ("sasrec", m) for m in adversarial.METHODS] + [
        ("gru4rec", m) for m in ("none", "seq", "cas")])
def test_every_method_trains_under_jit(make_config, method, model_name):
  config = make_config(**{"model.name": model_name})
  ds = data.load_from_config(config.data)
  arrays = data.build_arrays(ds, config.data.max_len)
  dd = train.device_data(arrays)
  model = models.build_model(config.model, arrays.num_items, arrays.max_len)
  opt = train.make_optimizer(config.train)
  state = train.init_state(model, opt, jax.random.PRNGKey(0), arrays.max_len)
  before = jax.tree.map(np.asarray, state.params)
  cfg = adversarial.method_config(method, eps=1.0)
  epoch, steps = train.make_train_epoch(
      adversarial.make_objective(model, cfg), opt, arrays.num_items,
      batching.plan_from_table(arrays.train_inputs, arrays.train_users, 64))
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
