import time

import jax.numpy as jnp
import numpy as np
import pytest

from cat_jax import cascade


def brute_force(seqs, b, temporal=True, cross=True):
  """Eq. 4.11 by a loop over every interaction and every other user."""
  m, T = seqs.shape
  C = np.zeros((m, T))
  for i in range(m):
    for t in range(1, T + 1):
      v = seqs[i, t - 1]
      if v == 0:
        continue
      s = 0.0
      for k in range(m):
        if k == i:
          continue
        for l in range(1, T + 1):
          if seqs[k, l - 1] == v:
            s += 1 + T - l
      first = (1 + T - t) if temporal else 1.0
      C[i, t - 1] = first + ((b / m) * s if cross else 0.0)
  return C


def random_windows(rng, m, T, N):
  seqs = np.zeros((m, T), np.int32)
  for i in range(m):
    n = rng.integers(1, T + 1)
    seqs[i, T - n:] = rng.integers(1, N + 1, n)  # repeats allowed
  return seqs


@pytest.mark.parametrize("temporal,cross", [(True, True), (True, False),
                                            (False, True)])
def test_matches_brute_force(temporal, cross):
  rng = np.random.default_rng(0)
  seqs = random_windows(rng, 13, 7, 9)
  got = np.asarray(cascade.cascade_scores(jnp.asarray(seqs), 4,
                                          temporal=temporal, cross=cross))
  want = brute_force(seqs, 4, temporal, cross)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert (got[seqs == 0] == 0).all()


def test_padding_rows_do_not_change_the_scores_given_num_users():
  """Tables padded with empty rows (for sharding) keep Eq. 4.11's m."""
  rng = np.random.default_rng(2)
  seqs = random_windows(rng, 13, 7, 9)
  padded = np.concatenate([seqs, np.zeros((3, 7), np.int32)])
  want = brute_force(seqs, 4)
  got = np.asarray(cascade.cascade_scores(jnp.asarray(padded), 4,
                                          num_users=13))
  np.testing.assert_allclose(got[:13], want, rtol=1e-5)
  assert (got[13:] == 0).all()
  w = cascade.weights_for_method(jnp.asarray(seqs), 4, "cas")
  w_pad = cascade.weights_for_method(jnp.asarray(padded), 4, "cas",
                                     num_users=13)
  np.testing.assert_allclose(np.asarray(w_pad)[:13], w, rtol=1e-6)


def test_needs_a_term():
  with pytest.raises(ValueError):
    cascade.cascade_scores(jnp.ones((2, 3), jnp.int32), 1, temporal=False,
                           cross=False)


def test_weights_have_mean_one_and_invert_the_order():
  rng = np.random.default_rng(1)
  seqs = jnp.asarray(random_windows(rng, 50, 10, 20))
  mask = seqs > 0
  C = cascade.cascade_scores(seqs, 8)
  w = np.asarray(cascade.perturbation_weights(C, mask))
  m = np.asarray(mask)
  assert w[m].mean() == pytest.approx(1.0, rel=1e-5)
  assert (w[~m] == 0).all()
  c = np.asarray(C)[m]
  order = np.argsort(c, kind="stable")
  assert (np.diff(w[m][order]) <= 1e-6).all()  # larger C, smaller weight
  np.testing.assert_allclose(w[m] * c, (w[m] * c)[0], rtol=1e-5)


def test_weights_for_method_uniform_and_cascade():
  seqs = jnp.array([[0, 1, 2], [3, 1, 2]])
  uni = np.asarray(cascade.weights_for_method(seqs, 2, "global"))
  np.testing.assert_array_equal(uni, [[0, 1, 1], [1, 1, 1]])
  cas = np.asarray(cascade.weights_for_method(seqs, 2, "cas"))
  assert cas[1, 0] < cas[1, 2]  # the first item is trained more: perturbed less
  temporal = np.asarray(cascade.weights_for_method(seqs, 2, "cas_temporal"))
  np.testing.assert_allclose(temporal[1] * np.array([3, 2, 1]),
                             temporal[1, 2], rtol=1e-6)


def test_ml1m_size_is_fast_on_cpu():
  rng = np.random.default_rng(2)
  m, T = 6040, 200  # ML-1M: about 1M interactions
  seqs = jnp.asarray(random_windows(rng, m, T, 3416))
  cascade.cascade_scores(seqs, 128, num_items=3416).block_until_ready()
  t0 = time.perf_counter()
  cascade.cascade_scores(seqs, 128, num_items=3416).block_until_ready()
  # Issue 3 asks for well under a second; allow a loaded CI machine 5 s.
  assert time.perf_counter() - t0 < 5.0


def test_weights_are_positive_exactly_at_real_positions():
  """adversarial reads the real positions off the weights (w > 0)."""
  rng = np.random.default_rng(3)
  seqs = jnp.asarray(random_windows(rng, 40, 8, 12))
  for method in ("global", "seq", "cas", "cas_temporal", "cas_cross"):
    w = np.asarray(cascade.weights_for_method(seqs, 8, method))
    np.testing.assert_array_equal(w > 0, np.asarray(seqs) > 0)
