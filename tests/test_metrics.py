import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cat_jax import evaluate, metrics
from conftest import init_params


def brute_force(scores, targets, exclude, ks):
  """An independent per-user loop over items."""
  out = {f"{m}@{k}": [] for k in ks for m in ("ndcg", "hr")}
  out["mrr"] = []
  for b in range(scores.shape[0]):
    t = targets[b]
    rank = 0
    for j in range(1, scores.shape[1]):
      if j != t and exclude[b, j]:
        continue
      if scores[b, j] >= scores[b, t]:
        rank += 1
    for k in ks:
      out[f"hr@{k}"].append(1.0 if rank <= k else 0.0)
      out[f"ndcg@{k}"].append(1.0 / math.log2(rank + 1) if rank <= k else 0.0)
    out["mrr"].append(1.0 / rank)
  return {k: np.array(v) for k, v in out.items()}


class FullRankingTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_brute_force(self):
    rng = np.random.default_rng(0)
    B, N = 17, 40
    # Integer-valued scores so that ties happen.
    scores = rng.integers(0, 6, size=(B, N + 1)).astype(np.float32)
    targets = rng.integers(1, N + 1, size=B)
    exclude = rng.random((B, N + 1)) < 0.3
    exclude[np.arange(B), targets] = rng.random(B) < 0.5  # target kept anyway
    ks = (1, 5, 10)
    fn = self.variant(lambda s, t, e: metrics.full_ranking_metrics(s, t, e, ks))
    got = fn(jnp.asarray(scores), jnp.asarray(targets), jnp.asarray(exclude))
    want = brute_force(scores, targets, exclude, ks)
    self.assertEqual(set(got), set(want))
    for k in want:
      chex.assert_shape(got[k], (B,))
      np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-6)

  def test_constant_scores_never_hit(self):
    B, N = 4, 50
    out = metrics.full_ranking_metrics(
        jnp.zeros((B, N + 1)), jnp.array([1, 7, 20, 50]),
        jnp.zeros((B, N + 1), bool), ks=(10,))
    np.testing.assert_array_equal(np.asarray(out["hr@10"]), 0.0)
    np.testing.assert_allclose(np.asarray(out["mrr"]), 1.0 / N)

  def test_history_and_padding_are_not_candidates(self):
    # Target 3 is beaten only by excluded item 2 and by padding column 0.
    scores = jnp.array([[9.0, 1.0, 8.0, 5.0, 4.0]])
    exclude = jnp.array([[False, False, True, False, False]])
    out = metrics.full_ranking_metrics(scores, jnp.array([3]), exclude, (1,))
    self.assertEqual(float(out["hr@1"][0]), 1.0)
    self.assertEqual(float(out["ndcg@1"][0]), 1.0)


def test_history_mask_ignores_sentinel_and_adds_extra():
  history = jnp.array([[2, 5, 7, 7], [1, 7, 7, 7]])  # 7 = sentinel for N=6
  mask = evaluate.history_mask(history, jnp.array([0, 4]), 6)
  chex.assert_shape(mask, (2, 7))
  assert np.flatnonzero(np.asarray(mask[0])).tolist() == [0, 2, 5]
  assert np.flatnonzero(np.asarray(mask[1])).tolist() == [1, 4]


def test_ranker_is_batch_size_independent_and_exact():
  rng = np.random.default_rng(1)
  E, T, N, H = 53, 6, 30, 8
  inputs = jnp.asarray(rng.integers(1, N + 1, (E, T)), jnp.int32)
  targets = jnp.asarray(rng.integers(1, N + 1, E), jnp.int32)
  users = jnp.arange(E, dtype=jnp.int32)
  history = np.sort(rng.integers(1, N + 2, (E, H)), axis=1).astype(np.int32)
  table = jnp.asarray(rng.normal(size=(N + 1, 4)), jnp.float32)

  def score_fn(params, x):  # a toy model: mean of the input embeddings
    return params[x].mean(axis=1) @ params.T

  extra = targets[::-1]
  ranks = {}
  for bs in (7, 16, 64):
    r = evaluate.make_ranker(score_fn, N, bs)(
        table, inputs, targets, users, extra, jnp.asarray(history))
    ranks[bs] = np.asarray(r)
  np.testing.assert_array_equal(ranks[7], ranks[16])
  np.testing.assert_array_equal(ranks[7], ranks[64])
  assert evaluate.summarize(ranks[7], (10,)) == evaluate.summarize(
      ranks[64], (10,))
  # And they are the brute-force ranks.
  scores = np.asarray(score_fn(table, inputs))
  exclude = np.zeros((E, N + 1), bool)
  for b in range(E):
    exclude[b, history[b][history[b] <= N]] = True
    exclude[b, int(extra[b])] = True
  want = brute_force(scores, np.asarray(targets), exclude, (10,))
  np.testing.assert_allclose(1.0 / ranks[7], want["mrr"], rtol=1e-6)


def test_summarize_matches_metrics_from_rank():
  ranks = np.array([1, 2, 3, 10, 11, 500])
  s = evaluate.summarize(ranks, (5, 10))
  per_user = metrics.metrics_from_rank(jnp.asarray(ranks), (5, 10))
  for k, v in per_user.items():
    assert s[k] == pytest.approx(float(np.mean(np.asarray(v))), rel=1e-6)
  assert s["users"] == 6


def test_chunked_ranker_matches_the_full_score_matrix():
  import ml_collections
  from cat_jax import models
  rng = np.random.default_rng(3)
  N, T, E, H = 61, 5, 37, 9
  cfg = ml_collections.ConfigDict(dict(name="sasrec", hidden=8, num_blocks=1,
                                       num_heads=1, dropout=0.0))
  model = models.build_model(cfg, N, T)
  params = init_params(model, T)
  inputs = jnp.asarray(rng.integers(0, N + 1, (E, T)), jnp.int32)
  targets = jnp.asarray(rng.integers(1, N + 1, E), jnp.int32)
  history = jnp.asarray(np.sort(rng.integers(1, N + 2, (E, H)), axis=1),
                        jnp.int32)
  users, extra = jnp.arange(E), jnp.asarray(rng.integers(0, N + 1, E))
  args = (params, inputs, targets, users, extra, history)
  full = evaluate.make_ranker(evaluate.model_scores(model), N, 8)(*args)
  for chunk in (7, 16, N + 1, 200):
    chunked = evaluate.make_chunked_ranker(model, N, 8, chunk)(*args)
    np.testing.assert_array_equal(np.asarray(chunked), np.asarray(full))


def test_public_metric_functions_take_numpy_arrays():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(5, 9)).astype(np.float32)
  targets = np.array([1, 2, 3, 4, 5])
  exclude = np.zeros((5, 9), bool)
  exclude[:, 6] = True
  out = metrics.full_ranking_metrics(scores, targets, exclude, ks=(3,))
  ref = metrics.full_ranking_metrics(jnp.asarray(scores), jnp.asarray(targets),
                                     jnp.asarray(exclude), ks=(3,))
  for k in ref:
    np.testing.assert_array_equal(out[k], ref[k])
  np.testing.assert_array_equal(
      metrics.metrics_from_rank(np.array([1, 4]), (3,))["hr@3"], [1.0, 0.0])


def test_the_test_ranking_excludes_the_validation_item():
  """At test time the validation item is history (`split_inputs`): a model
  that puts the last item of the window first and the next item second
  ranks every test target first, and would rank it second if the
  validation item (the last of the test window) were still a candidate."""
  from cat_jax import batching, data
  seqs = [np.arange(1, 6), np.arange(6, 10), np.arange(10, 16)]
  ds = data.Dataset(sequences=seqs, num_items=15, user_ids=[0, 1, 2],
                    item_ids=list(range(1, 16)))
  tables = batching.device_data(data.build_arrays(ds, max_len=4))
  N = ds.num_items

  def score_fn(_, x):
    last = jax.nn.one_hot(x[:, -1], N + 1)
    return 10.0 * last + 9.0 * jnp.roll(last, 1, axis=1)

  ranker = evaluate.make_ranker(score_fn, N, batch_size=2)
  for split in ("valid", "test"):
    inputs, targets, users, extra = evaluate.split_inputs(tables, split)
    last = np.asarray(inputs)[:, -1]
    np.testing.assert_array_equal(np.asarray(targets), last + 1)
    if split == "test":  # the window ends with the validation item
      np.testing.assert_array_equal(last, np.asarray(
          tables["valid_targets"]))
    ranks = ranker(None, inputs, targets, users, extra, tables["history"])
    np.testing.assert_array_equal(np.asarray(ranks), [1, 1, 1])


def test_popularity_ranks_on_the_host_equal_the_device_ranker():
  """`evaluate.popularity_ranks` (no compile) gives the ranks of the device
  ranker with popularity scores: ties (many equal counts), repeated history
  items, an extra item already in the history, the target in the history,
  padding rows (target 0)."""
  rng = np.random.default_rng(3)
  E, U, N, H = 61, 40, 25, 9
  history = np.sort(rng.integers(1, N + 2, (U, H)), axis=1).astype(np.int32)
  history[0, :3] = 4  # repeats
  users = rng.integers(0, U, E).astype(np.int32)
  targets = rng.integers(1, N + 1, E).astype(np.int32)
  targets[:3] = 0  # padding rows
  targets[5] = history[users[5], 0] if history[users[5], 0] <= N else 1
  extra = rng.integers(0, N + 1, E).astype(np.int32)
  extra[7] = history[users[7], 1]
  counts = np.bincount(history.ravel(), minlength=N + 2)[:N + 1].astype(
      np.float32)
  counts[0] = 0.0
  want = evaluate.make_ranker(evaluate._popularity_scores, N, 16)(
      jnp.asarray(counts), jnp.zeros((E, 3), jnp.int32),
      jnp.asarray(targets), jnp.asarray(users), jnp.asarray(extra),
      jnp.asarray(history))
  got = evaluate.popularity_ranks(counts, targets, users, extra, history,
                                  chunk=13)
  np.testing.assert_array_equal(got, np.asarray(want))
  assert got[0] == 0 and got[10] > 0
