import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cat_jax import models
from conftest import init_params

N, T, D = 30, 8, 16


def build(name, **kw):
  cfg = ml_collections.ConfigDict(dict(name=name, hidden=D, num_blocks=2,
                                       num_heads=2, dropout=0.2))
  cfg.update(kw)
  model = models.build_model(cfg, N, T)
  params = init_params(model, T)
  return model, params


def encode_ids(model, params, ids, **kw):
  return model.encode(params, model.embed(params, ids), ids > 0, **kw)


@pytest.mark.parametrize("name", models.MODELS)
def test_shapes_and_item_table(name):
  model, params = build(name)
  ids = jnp.array([[0, 0, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 9]])
  S = model.embed(params, ids)
  chex.assert_shape(S, (2, T, D))
  W = model.encode(params, S, ids > 0)
  chex.assert_shape(W, (2, T, D))
  chex.assert_tree_all_finite(W)
  E = model.items(params)
  chex.assert_shape(E, (N + 1, D))
  np.testing.assert_allclose(np.asarray(S), np.asarray(E[ids]))


@pytest.mark.parametrize("name", models.MODELS)
def test_causal_future_items_do_not_change_the_past(name):
  model, params = build(name)
  a = jnp.array([[0, 0, 3, 4, 5, 6, 7, 8]])
  b = a.at[0, 6:].set(jnp.array([11, 12]))
  Wa, Wb = encode_ids(model, params, a), encode_ids(model, params, b)
  np.testing.assert_allclose(np.asarray(Wa[:, :6]), np.asarray(Wb[:, :6]),
                             atol=1e-5)
  assert not np.allclose(np.asarray(Wa[:, 7]), np.asarray(Wb[:, 7]))


def test_gru_ignores_left_padding():
  model, params = build("gru4rec")
  short = jnp.array([[0, 0, 0, 0, 0, 3, 4, 5]])
  W = encode_ids(model, params, short)
  np.testing.assert_array_equal(np.asarray(W[0, :5]), 0.0)
  # The state after the 3 items equals that of a window with no padding
  # but the same 3 items: run a T=3 model with the same parameters.
  cfg = ml_collections.ConfigDict(dict(name="gru4rec", hidden=D, dropout=0.2,
                                       num_blocks=1, num_heads=1))
  small = models.build_model(cfg, N, 3)
  W3 = encode_ids(small, params, jnp.array([[3, 4, 5]]))
  np.testing.assert_allclose(np.asarray(W[0, 5:]), np.asarray(W3[0]),
                             atol=1e-5)


def test_sasrec_padding_keys_are_ignored():
  model, params = build("sasrec")
  ids = jnp.array([[0, 0, 0, 0, 0, 3, 4, 5]])
  S = model.embed(params, ids)
  # Garbage in the padding slots must not reach the real positions.
  S2 = S.at[0, :5].set(100.0)
  W = model.encode(params, S, ids > 0)
  W2 = model.encode(params, S2, ids > 0)
  np.testing.assert_allclose(np.asarray(W[0, 5:]), np.asarray(W2[0, 5:]),
                             atol=1e-5)


@pytest.mark.parametrize("name", models.MODELS)
def test_dropout_needs_rng_and_is_deterministic_given_it(name):
  model, params = build(name)
  ids = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]])
  with pytest.raises(ValueError, match="rng"):
    encode_ids(model, params, ids, train=True)
  k = jax.random.PRNGKey(3)
  a = encode_ids(model, params, ids, train=True, rng=k)
  b = encode_ids(model, params, ids, train=True, rng=k)
  c = encode_ids(model, params, ids, train=True, rng=jax.random.PRNGKey(4))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))


def test_unknown_model_is_a_clear_error():
  cfg = ml_collections.ConfigDict(dict(name="bert4rec"))
  with pytest.raises(ValueError, match="Unknown model.name 'bert4rec'"):
    models.build_model(cfg, N, T)


@pytest.mark.parametrize("name", models.MODELS)
def test_bfloat16_encoder_keeps_float32_params_and_outputs(name):
  model, params = build(name)
  model16, params16 = build(name, dtype="bfloat16")
  chex.assert_trees_all_equal_dtypes(params, params16)
  ids = jnp.array([[0, 0, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 9]])
  W = encode_ids(model, params, ids)
  W16 = encode_ids(model16, params, ids)
  assert W16.dtype == jnp.float32
  # bf16 keeps ~3 significant digits: close, but not equal.
  err = float(jnp.linalg.norm(W16 - W) / jnp.linalg.norm(W))
  assert 0 < err < 0.05, err
