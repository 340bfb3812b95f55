"""Several runs vectorized in one program give each run's own result."""

import jax
import numpy as np

from cat_jax import adversarial, cascade, data, evaluate, models, train


def test_vmapped_runs_match_runs_trained_alone(make_config):
  config = make_config()
  arrays = data.build_arrays(data.load_from_config(config.data),
                             config.data.max_len)
  N, T = arrays.num_items, arrays.max_len
  dd = train.device_data(arrays)
  model = models.build_model(config.model, N, T)
  opt = train.make_optimizer(config.train)
  objective = adversarial.make_objective(
      model, adversarial.method_config("cas", eps=0.5))
  pert = cascade.weights_for_method(dd["train_inputs"], 64, "cas")
  n_users = int(dd["train_users"].shape[0])
  seeds = [0, 1]
  init_keys = jax.numpy.stack([jax.random.PRNGKey(s) for s in seeds])

  multi, _ = train.make_train_epoch(objective, opt, N, 64, n_users, runs=True)
  states = train.init_states(model, opt, init_keys, T)
  for e in range(2):
    keys = jax.numpy.stack([jax.random.fold_in(k, e) for k in init_keys])
    states, terms = multi(states, dd, pert, keys)
  assert np.asarray(terms["loss"]).shape[0] == 2
  multi_ranks = evaluate.make_ranker(evaluate.model_scores(model), N, 96,
                                     runs=True)(
      states.params, *evaluate.split_inputs(dd, "valid"), dd["history"])

  single, _ = train.make_train_epoch(objective, opt, N, 64, n_users)
  ranker = evaluate.make_ranker(evaluate.model_scores(model), N, 96)
  flat = lambda p: np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)])
  finals = []
  for r, k in enumerate(init_keys):
    state = train.init_state(model, opt, k, T)
    for e in range(2):
      state, t = single(state, dd, pert, jax.random.fold_in(k, e))
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
