"""Several runs vectorized in one program give each run's own result."""

import json
import os

import jax
import numpy as np

from cat_jax import adversarial, batching, cascade, data, evaluate, models
from cat_jax import train
from cat_jax.experiments import common


def test_vmapped_runs_match_runs_trained_alone(make_config):
  # The programs of the runs of test_train_runs_match_train_and_evaluate
  # (GRU4Rec, cas, two seeds; built as a run builds them), which the
  # persistent compilation cache compiles once.
  from conftest import run_epoch, run_ranker
  config = make_config(**{"model.name": "gru4rec"})
  arrays = data.build_arrays(data.load_from_config(config.data),
                             config.data.max_len)
  N, T = arrays.num_items, arrays.max_len
  dd = train.device_data(arrays)
  model = models.build_model(config.model, N, T)
  opt = train.make_optimizer(config.train)
  cfg = adversarial.method_config("cas", eps=0.5)
  pert = cascade.weights_for_method(dd["train_inputs"], 64, "cas")
  seeds = [0, 1]
  init_keys = jax.numpy.stack([jax.random.PRNGKey(s) for s in seeds])

  plan = batching.plan_from_table(arrays.train_inputs, arrays.train_users, 64)
  multi, _ = run_epoch(model, opt, N, plan, cfg, runs=True)
  states = train.init_states(model, opt, init_keys, T)
  for e in range(2):
    keys = jax.numpy.stack([jax.random.fold_in(k, e) for k in init_keys])
    states, terms = multi(states, dd, pert, keys, jax.random.PRNGKey(e))
  assert np.asarray(terms["loss"]).shape[0] == 2
  multi_ranks = run_ranker(model, N, 96, runs=True)(
      states.params, *evaluate.split_inputs(dd, "valid"), dd["history"])

  single, _ = run_epoch(model, opt, N, plan, cfg)
  ranker = run_ranker(model, N, 96)
  flat = lambda p: np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)])
  finals = []
  for r, k in enumerate(init_keys):
    state = train.init_state(model, opt, k, T)
    for e in range(2):
      state, t = single(state, dd, pert, jax.random.fold_in(k, e),
                        jax.random.PRNGKey(e))
    np.testing.assert_allclose(np.asarray(t["loss"]),
                               np.asarray(terms["loss"][r]), rtol=1e-4)
    mine = flat(jax.tree.map(lambda x: x[r], states.params))
    alone = flat(state.params)
    assert np.linalg.norm(mine - alone) < 1e-3 * np.linalg.norm(alone)
    ranks = np.asarray(ranker(state.params,
                              *evaluate.split_inputs(dd, "valid"),
                              dd["history"]))
    assert np.mean(ranks == np.asarray(multi_ranks[r])) > 0.95
    finals.append(alone)
  # The runs really are different runs.
  assert np.linalg.norm(finals[0] - finals[1]) > 0.1 * np.linalg.norm(
      finals[0])


def _curve(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_train_runs_match_train_and_evaluate(make_config, tmp_path):
  """Seeds trained in one vectorized program == each seed trained alone."""
  config = make_config(**{"train.epochs": 3, "train.eval_every": 1,
                          "adv.epochs": 2, "adv.method": "cas",
                          "adv.eps": 0.5, "model.name": "gru4rec"})
  seeds = [0, 1]
  vec = str(tmp_path / "vec")
  runs = common.run_variants(config, vec, seeds, {"cas": {}}, vectorize=True)
  for s in seeds:
    alone_dir = tmp_path / f"alone{s}"
    alone = train.train_and_evaluate(
        common.apply_overrides(config, {"seed": s}), str(alone_dir))
    # Same files, same validation curve in both phases, same test result.
    seed_dir = os.path.join(vec, f"seed{s}")
    pre = _curve(os.path.join(seed_dir, "metrics.jsonl"))
    cas = _curve(os.path.join(seed_dir, "cas", "metrics.jsonl"))
    ref = _curve(alone_dir / "metrics.jsonl")
    assert [r["epoch"] for r in pre + cas] == [r["epoch"] for r in ref]
    for a, b in zip(pre + cas, ref):
      for k in ("valid/ndcg@10", "test/ndcg@10", "train/loss"):
        if k in b:
          assert abs(a[k] - b[k]) < 0.01, (k, a, b)
    for k in common.METRICS:
      assert abs(runs["cas"][s][k] - alone["cas"][k]) < 0.01
  assert runs["cas"][0] != runs["cas"][1]

  # A finished vectorized sweep is read back, not retrained.
  mtime = os.path.getmtime(os.path.join(vec, "seed1", "cas", "cas",
                                        "results.json"))
  again = common.run_variants(config, vec, seeds, {"cas": {}},
                              vectorize=True)
  assert again == runs
  assert mtime == os.path.getmtime(os.path.join(vec, "seed1", "cas", "cas",
                                                "results.json"))


def test_vectorized_sweep_extends_a_sequential_one(make_config, tmp_path):
  """Seed 0 trained alone before; --vectorize then adds seeds 1 and 2."""
  # GRU4Rec: the programs of the test above (two seeds in one program).
  config = make_config(**{"train.epochs": 2, "train.eval_every": 2,
                          "adv.epochs": 1, "adv.method": "none",
                          "model.name": "gru4rec"})
  w = str(tmp_path)
  first = common.run_variants(config, w, [0], {"none": {}})
  mtime = os.path.getmtime(os.path.join(w, "seed0", "none", "none",
                                        "results.json"))
  runs = common.run_variants(config, w, [0, 1, 2], {"none": {}},
                             vectorize=True)
  assert runs["none"][0] == first["none"][0]
  assert mtime == os.path.getmtime(os.path.join(w, "seed0", "none", "none",
                                                "results.json"))
  assert len({runs["none"][s]["test/ndcg@10"] for s in (0, 1, 2)}) == 3
