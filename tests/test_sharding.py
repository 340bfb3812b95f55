"""Data-parallel training and sharded evaluation on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cat_jax import adversarial, batching, cascade, data, evaluate, models
from cat_jax import sharding, train
from conftest import init_params

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8 "
    "(set by tests/conftest.py before JAX starts)")


def setup(make_config, model_name="sasrec"):
  config = make_config(**{"train.batch_size": 64, "model.name": model_name})
  arrays = data.build_arrays(data.load_from_config(config.data),
                             config.data.max_len)
  model = models.build_model(config.model, arrays.num_items, arrays.max_len)
  opt = train.make_optimizer(config.train)
  return config, arrays, model, opt


@pytest.mark.parametrize("method", ["cas"])  # cas runs every loss term
def test_data_parallel_epoch_matches_one_device(make_config, method):
  # GRU4Rec compiles several times faster; splitting a batch over devices
  # does not depend on the encoder (SASRec runs sharded end to end below).
  config, arrays, model, opt = setup(make_config, "gru4rec")
  cfg = adversarial.method_config(method, eps=0.5)
  objective = adversarial.make_objective(model, cfg)
  results = []
  for n in (1, 8):
    mesh = sharding.make_mesh(n)
    dd = sharding.replicate(train.device_data(arrays), mesh)
    state = sharding.replicate(
        train.init_state(model, opt, jax.random.PRNGKey(0), arrays.max_len),
        mesh)
    pert = cascade.weights_for_method(dd["train_inputs"], 64, method)
    epoch, _ = train.make_train_epoch(
        objective, opt, arrays.num_items, batching.plan_from_table(
            arrays.train_inputs, arrays.train_users, 64), mesh)
    for e in range(2):
      state, terms = epoch(state, dd, pert, jax.random.PRNGKey(e),
                           jax.random.PRNGKey(e))
    if n == 8:
      leaf = jax.tree.leaves(state.params)[0]
      assert len(leaf.sharding.device_set) == 8
    results.append((jax.device_get(state.params), jax.device_get(terms)))
  (p1, t1), (p8, t8) = results
  np.testing.assert_allclose(t1["loss"], t8["loss"], rtol=2e-4)
  # Float reductions run in another order across devices, and Adam turns
  # round-off in near-zero gradients into lr-sized steps, so compare the
  # parameter vectors as a whole; adversarial directions g/||g|| amplify
  # round-off a little more.
  flat = lambda p: np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)])
  a, b = flat(p1), flat(p8)
  tol = 1e-3 if method == "none" else 5e-3
  assert np.linalg.norm(a - b) < tol * np.linalg.norm(a)


def test_sharded_evaluation_gives_identical_ranks(make_config):
  config, arrays, model, opt = setup(make_config)
  params = init_params(model, arrays.max_len, seed=1)
  ranks = []
  for n in (1, 8):
    mesh = sharding.make_mesh(n)
    dd = sharding.replicate(train.device_data(arrays), mesh)
    ranker = evaluate.make_ranker(evaluate.model_scores(model),
                                  arrays.num_items, 64, mesh)
    r = ranker(sharding.replicate(params, mesh),
               *evaluate.split_inputs(dd, "test"), dd["history"])
    ranks.append(np.asarray(r))
  np.testing.assert_array_equal(ranks[0], ranks[1])


@pytest.mark.parametrize("chunk", [16, 50])
def test_item_sharded_evaluation_gives_identical_ranks(make_config, chunk):
  """The catalog split over 8 devices ranks exactly as the full matrix."""
  config, arrays, model, opt = setup(make_config)
  params = init_params(model, arrays.max_len, seed=1)
  dd = train.device_data(arrays)
  full = evaluate.make_ranker(evaluate.model_scores(model), arrays.num_items,
                              40)(params, *evaluate.split_inputs(dd, "test"),
                                  dd["history"])
  mesh = sharding.make_mesh(8)
  ranker = evaluate.make_chunked_ranker(model, arrays.num_items, 40, chunk,
                                        mesh, shard_items=True)
  r = ranker(sharding.replicate(params, mesh),
             *evaluate.split_inputs(sharding.replicate(dd, mesh), "test"),
             dd["history"])
  # 121 ids over 8 devices x chunks of 16 or 50: shards hold padding too.
  np.testing.assert_array_equal(np.asarray(r), np.asarray(full))


@pytest.mark.parametrize("evaluation", [{}, {"eval.item_chunk": 32,
                                             "eval.shard_items": True}])
def test_end_to_end_data_parallel(make_config, tmp_path, evaluation):
  config = make_config(**{"parallel.devices": 2, "train.epochs": 8,
                           "train.eval_every": 8, **evaluation})
  r = train.train_and_evaluate(config, str(tmp_path))
  assert r["pretrain"]["test/ndcg@10"] > r["popularity/valid"]["ndcg@10"]


def test_clear_errors():
  with pytest.raises(ValueError, match="only 8 devices"):
    sharding.make_mesh(9)
  with pytest.raises(ValueError, match="must be a multiple of the 8"):
    sharding.check_divisible(100, sharding.make_mesh(8), "eval.batch_size")


@pytest.mark.parametrize("layout", [
    {}, {"train.layout": "packed", "train.pack_rows": 4}])
def test_vectorized_runs_on_a_data_parallel_mesh(make_config, tmp_path,
                                                 layout):
  """Seeds stacked with vmap and batches split over 2 devices: same result.
  Packed (`packing`): each run orders its rows with its own key, and the
  rows of a step are split."""
  results = {}
  for n in (1, 2):
    # GRU4Rec: on one device, the programs of tests/test_multirun.py's runs.
    config = make_config(**{"parallel.devices": n, "train.epochs": 2,
                            "train.eval_every": 2, "model.name": "gru4rec",
                            **layout})
    runs = train.train_runs(config, [str(tmp_path / f"{n}_{s}")
                                     for s in (0, 1)], [0, 1])
    results[n] = [r["pretrain"]["valid/ndcg@10"] for r in runs]
  np.testing.assert_allclose(results[1], results[2], atol=2e-3)
  assert results[1][0] != results[1][1]


def test_sharded_tables_hold_the_same_rows(make_config):
  """Row-sharded tables are build_arrays' rows plus empty padding rows."""
  config = make_config(**{"data.synthetic.num_users": 403})
  ds = data.load_from_config(config.data)
  arrays = data.build_arrays(ds, config.data.max_len)
  mesh = sharding.make_mesh(8)
  dd = train.sharded_device_data(ds, config.data.max_len, mesh)
  full = train.device_data(arrays)
  U, E, N = ds.num_users, len(arrays.eval_users), ds.num_items
  for k, v in dd.items():
    v = np.asarray(v)
    if k == "train_users":
      np.testing.assert_array_equal(v, full[k])
      continue
    n = U if k.startswith("train") or k == "history" else E
    assert v.shape[0] % 8 == 0 and v.shape[0] >= n, k
    assert len(dd[k].sharding.device_set) == 8, k
    np.testing.assert_array_equal(v[:n], full[k], err_msg=k)
    pad = v[n:]
    if k == "history":
      assert (pad == N + 1).all()
    elif k != "eval_users":
      assert (pad == 0).all(), k


def test_sharded_tables_train_and_rank_as_replicated_ones(make_config):
  """A cas epoch and an evaluation on row-sharded tables (8 devices) match
  replicated tables: padding rows neither train, nor count in Eq. 4.11's
  m, nor in the metrics."""
  method = "cas"
  config = make_config(**{"data.synthetic.num_users": 403,
                          "model.name": "gru4rec"})  # compiles faster
  ds = data.load_from_config(config.data)
  arrays = data.build_arrays(ds, config.data.max_len)
  model = models.build_model(config.model, ds.num_items, config.data.max_len)
  opt = train.make_optimizer(config.train)
  objective = adversarial.make_objective(
      model, adversarial.method_config(method, eps=0.5))
  mesh = sharding.make_mesh(8)
  out = []
  for dd in (sharding.replicate(train.device_data(arrays), mesh),
             train.sharded_device_data(ds, config.data.max_len, mesh)):
    state = sharding.replicate(train.init_state(
        model, opt, jax.random.PRNGKey(0), config.data.max_len), mesh)
    pert = cascade.weights_for_method(dd["train_inputs"], 64, method,
                                      num_users=ds.num_users)
    epoch, _ = train.make_train_epoch(
        objective, opt, ds.num_items, batching.plan_from_table(
            arrays.train_inputs, arrays.train_users, 64), mesh)
    state, terms = epoch(state, dd, pert, jax.random.PRNGKey(3),
                         jax.random.PRNGKey(3))
    ranker = evaluate.make_ranker(evaluate.model_scores(model), ds.num_items,
                                  64, mesh)
    # Ranks of the same (initial) parameters must be identical.
    params = sharding.replicate(
        init_params(model, config.data.max_len, seed=1), mesh)
    ranks = np.asarray(ranker(params, *evaluate.split_inputs(dd, "test"),
                              dd["history"]))
    pop = evaluate.evaluate_popularity(dd, ds.num_items, 64, (10,), mesh=mesh)
    out.append((np.asarray(pert)[:ds.num_users], jax.device_get(terms),
                evaluate.summarize(ranks, (10,)), pop))
  (p0, t0, m0, q0), (p1, t1, m1, q1) = out
  np.testing.assert_allclose(p0, p1, rtol=1e-6)
  # Adversarial directions g/||g|| amplify round-off of the sharded gather.
  np.testing.assert_allclose(t0["loss"], t1["loss"], rtol=1e-4)
  assert m0["users"] == m1["users"] == len(arrays.eval_users)
  assert m0 == m1 and q0 == q1
