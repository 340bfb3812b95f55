import jax
import jax.numpy as jnp
import numpy as np

from cat_jax import sampling


def random_histories(rng, N, H, sizes):
  """Sorted histories padded with N+1 ([B, H]) and the same as Python sets."""
  hist = np.full((len(sizes), H), N + 1, np.int32)
  sets = []
  for b, size in enumerate(sizes):
    items = np.sort(rng.choice(np.arange(1, N + 1), size=size, replace=False))
    hist[b, :size] = items
    sets.append(set(items.tolist()))
  return hist, sets


def test_in_history_matches_python_sets():
  rng = np.random.default_rng(0)
  N, B, H = 50, 9, 12
  hist, sets = random_histories(rng, N, H, rng.integers(1, H + 1, size=B))
  q = rng.integers(1, N + 1, size=(B, 20))
  got = np.asarray(sampling.in_history(jnp.asarray(hist), jnp.asarray(q)))
  want = np.array([[int(x) in sets[b] for x in q[b]] for b in range(B)])
  np.testing.assert_array_equal(got, want)


def test_negatives_never_hit_the_whole_history():
  # Histories much longer than the window T=5 and covering most items, so
  # a sampler that only looked at the window would fail.
  rng = np.random.default_rng(1)
  N, B, T = 40, 16, 5
  hist, sets = random_histories(rng, N, N, [N - 3 - b % 3 for b in range(B)])
  fn = jax.jit(sampling.sample_negatives, static_argnums=(2, 3))
  seen = [set() for _ in range(B)]
  for seed in range(20):
    neg = np.asarray(fn(jax.random.PRNGKey(seed), jnp.asarray(hist), (B, T), N))
    assert neg.shape == (B, T)
    assert ((neg >= 1) & (neg <= N)).all()
    for b in range(B):
      assert not (set(neg[b].tolist()) & sets[b])
      seen[b] |= set(neg[b].tolist())
  # Every allowed item shows up (uniform over the complement).
  for b in range(B):
    assert seen[b] == set(range(1, N + 1)) - sets[b]
