"""Data poisoning (issue 14): fake users, target metrics, the runner."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cat_jax import batching, data, evaluate, models, poisoning, train
from cat_jax.experiments import poisoning as runner

U, N = 300, 90


@pytest.fixture(scope="module")
def clean():
  return data.synthetic_dataset(num_users=U, num_items=N, num_clusters=6,
                                mean_length=10.0, seed=3)


def brute_popularity(ds):
  """Training interactions of each item over the real users, by loops."""
  counts = {i: 0 for i in range(1, ds.num_items + 1)}
  for u in range(ds.num_real_users):
    seq = [int(x) for x in ds.sequences[u]]
    for i in (seq[:-2] if len(seq) >= 3 else seq):
      counts[i] += 1
  return counts


def test_fake_users_are_appended_to_training_only(clean):
  ds, targets = poisoning.poison(clean, "random", share=0.05, num_targets=3,
                                 filler_len=4, repeats=3, seed=1)
  n = poisoning.num_fake_users(U, 0.05)
  assert n == 15
  assert (ds.num_users, ds.num_real_users, ds.num_fake_users) == (U + n, U, n)
  assert ds.num_items == clean.num_items and ds.item_ids == clean.item_ids
  assert ds.user_ids[:U] == clean.user_ids
  assert ds.user_ids[U:] == [f"fake{k}" for k in range(n)]
  for u in range(U):  # real users untouched
    np.testing.assert_array_equal(ds.sequences[u], clean.sequences[u])
  fakes = [np.asarray(s) for s in ds.sequences[U:]]
  assert all(len(s) == 15 and s.min() >= 1 and s.max() <= N for s in fakes)
  # Their whole sequence is training data: no validation / test item.
  for u in range(U, U + n):
    tr, v, t = data.split(ds.sequences[u])
    np.testing.assert_array_equal(tr, fakes[u - U])
    assert (v, t) == (0, 0) and not ds.is_real(u)
  # They train ...
  T = 12
  train_users = data.train_user_index(ds)
  np.testing.assert_array_equal(train_users[:-n], data.train_user_index(clean))
  np.testing.assert_array_equal(train_users[-n:], np.arange(U, U + n))
  inputs, tg, hist = data.train_rows(ds, np.arange(U, U + n), T,
                                     data.history_width(ds))
  for r, s in enumerate(fakes):
    np.testing.assert_array_equal(inputs[r], data.left_pad(s[:-1], T))
    np.testing.assert_array_equal(tg[r], data.left_pad(s[1:], T))
    np.testing.assert_array_equal(hist[r][hist[r] <= N], np.sort(s))
  # ... at their whole length in the length buckets too,
  np.testing.assert_array_equal(
      batching.train_window_lengths(ds, np.arange(U, U + n), T),
      [min(len(s) - 1, T) for s in fakes])
  # ... and are never evaluated: same evaluation users and tables.
  a, b = data.build_arrays(clean, T), data.build_arrays(ds, T)
  for name in ("eval_users", "valid_inputs", "valid_targets", "test_inputs",
               "test_targets"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
  np.testing.assert_array_equal(a.train_inputs, b.train_inputs[:U])
  assert b.train_inputs.shape[0] == U + n
  assert len(np.setdiff1d(np.arange(U, U + n), b.eval_users)) == n
  # describe: the real users' statistics, the fake ones apart.
  d0, d1 = data.describe(clean), data.describe(ds)
  assert d1 == {**d0, "fake_users": n,
                "fake_interactions": int(sum(len(s) for s in fakes))}
  # Backward compatible construction; ids never collide.
  plain = data.Dataset(sequences=[np.array([1, 2, 3])], num_items=3,
                       user_ids=["fake0"], item_ids=[1, 2, 3])
  assert plain.num_real_users == 1 and plain.num_fake_users == 0
  assert poisoning.fake_user_ids(plain, 2) == ["_fake0", "_fake1"]
  with pytest.raises(ValueError, match="num_real_users"):
    data.Dataset(sequences=[np.array([1, 2])], num_items=2, user_ids=[0],
                 item_ids=[1, 2], num_real_users=2)


def test_clean_metrics_do_not_change_with_fake_users(clean, make_config):
  """The same model (random init) scores the real users the same whether
  or not fake users were added: same ranks on validation and test."""
  config = make_config(**{"data.synthetic.num_users": U,
                          "data.synthetic.num_items": N,
                          "model.name": "gru4rec"})
  ds, _ = poisoning.poison(clean, "bandwagon", share=0.1, seed=2)
  model = models.build_model(config.model, N, 12)
  params = train.init_state(model, train.make_optimizer(config.train),
                            jax.random.PRNGKey(0), 12).params
  ranker = evaluate.make_ranker(evaluate.model_scores(model), N, 64)
  out = []
  for d in (clean, ds):
    dd = batching.device_data(data.build_arrays(d, 12))
    out.append([np.asarray(ranker(params, *evaluate.split_inputs(dd, split),
                                  dd["history"]))
                for split in ("valid", "test")])
  for x, y in zip(*out):
    assert x.min() >= 1
    np.testing.assert_array_equal(x, y)
  # The plan of the train step holds the fake users.
  dd = batching.device_data(data.build_arrays(ds, 12))
  plan, _ = train.make_plans(config, ds, dd)
  assert set(range(U, ds.num_users)) <= set(np.asarray(plan.users).tolist())


def test_load_from_config_poisons_deterministically(make_config):
  config = make_config(**{"data.poison.attack": "random",
                          "data.poison.share": 0.05})
  a, b = (poisoning.load_from_config(config.data) for _ in range(2))
  clean = poisoning.load_from_config(make_config().data)
  assert a.num_fake_users == 20 and clean.num_fake_users == 0
  # The data pipeline itself loads the clean data set.
  assert data.load_from_config(config.data).num_fake_users == 0
  for x, y in zip(a.sequences, b.sequences):
    np.testing.assert_array_equal(x, y)
  want, _ = poisoning.poison(clean, "random", share=0.05)
  for x, y in zip(a.sequences, want.sequences):
    np.testing.assert_array_equal(x, y)
  assert data.describe(a)["fake_users"] == 20
  with pytest.raises(ValueError, match="Unknown data.poison.attack 'spam'"):
    poisoning.load_from_config(
        make_config(**{"data.poison.attack": "spam"}).data)


def test_attacks_are_reproducible_and_follow_the_rules(clean):
  kw = dict(share=0.1, num_targets=4, filler_len=3, repeats=2,
            popular_share=0.1)
  r0, t0 = poisoning.poison(clean, "random", seed=0, **kw)
  r0b, t0b = poisoning.poison(clean, "random", seed=0, **kw)
  r1, t1 = poisoning.poison(clean, "random", seed=1, **kw)
  fakes = lambda d: [np.asarray(s).tolist() for s in d.sequences[U:]]
  assert fakes(r0) == fakes(r0b) and t0.tolist() == t0b.tolist()
  assert fakes(r0) != fakes(r1) and t0.tolist() != t1.tolist()
  # Targets: uniformly among the less popular half (ties by item id), the
  # same for every attack of a seed, and for the clean and poisoned data.
  pop = brute_popularity(clean)
  order = sorted(pop, key=lambda i: (pop[i], i))
  bottom = set(order[:N // 2])
  np.testing.assert_array_equal(poisoning.item_popularity(clean)[1:],
                                [pop[i] for i in range(1, N + 1)])
  for t in (t0, t1):
    assert len(set(t.tolist())) == 4 and set(t.tolist()) <= bottom
  b0, tb = poisoning.poison(clean, "bandwagon", seed=0, **kw)
  assert tb.tolist() == t0.tolist()
  assert poisoning.choose_targets(b0, 4, 0).tolist() == t0.tolist()
  # Layout: repeats x (filler_len distinct fillers, then the target),
  # fake user k promoting target k mod 4; fillers are never targets.
  popular = set(sorted(pop, key=lambda i: (-pop[i], i))[:math.ceil(0.1 * N)])
  for d, fill_pool in ((r0, set(range(1, N + 1))), (b0, popular)):
    for k, s in enumerate(fakes(d)):
      assert len(s) == 2 * 4
      target = int(t0[k % 4])
      assert s[3] == s[7] == target
      fill = s[:3] + s[4:7]
      assert len(set(fill)) == 6 and not set(fill) & set(t0.tolist())
      assert set(fill) <= fill_pool
  # Bandwagon fillers are popular items, random ones are not (all).
  rand_fill = {i for s in fakes(r0) for i in s} - set(t0.tolist())
  assert len(rand_fill - popular) > 10
  # Every training count of the popular items beats the median.
  assert min(pop[i] for i in popular) >= sorted(pop.values())[N // 2]


def test_target_metrics_against_brute_force():
  """T-HR@K / T-NDCG@K on a toy score matrix with ties, history exclusion,
  a user whose history (or validation item) holds a target, and a padding
  row, against loops; batch size 5 does not divide the 13 rows."""
  rng = np.random.default_rng(0)
  E, NI, H = 13, 70, 6
  scores = rng.integers(0, 8, (E + 1, NI + 1)).astype(np.float32)
  targets = [3, 17, 40]
  scores[1:4, 3] = 8  # target 3 on top for users 0-2 (rank 1) ...
  scores[4:7, 3] = 7  # ... tied with the best items for users 3-5
  hist = [sorted(rng.choice(np.arange(1, NI + 1), rng.integers(1, H + 1),
                            replace=False).tolist()) for _ in range(E)]
  hist[1] = sorted(set(hist[1]) | {17})        # a target in the history
  valid_items = rng.integers(1, NI + 1, E)
  valid_items[2] = 40                          # a target as validation item
  test_items = rng.integers(1, NI + 1, E)
  test_items[4] = 0                            # a padding row
  history = np.full((E, H + 1), NI + 1, np.int32)
  for e, h in enumerate(hist):
    history[e, :len(h)] = h
  d = {"test_inputs": jnp.asarray(np.arange(1, E + 1)[:, None], jnp.int32),
       "test_targets": jnp.asarray(test_items, jnp.int32),
       "valid_targets": jnp.asarray(valid_items, jnp.int32),
       "eval_users": jnp.arange(E, dtype=jnp.int32),
       "history": jnp.asarray(history)}
  score_fn = lambda p, inputs: p[inputs[:, 0]]
  ranks, valid = poisoning.target_ranks(score_fn, jnp.asarray(scores), d, NI,
                                        targets, batch_size=5)
  for K in (50, 3):
    got = poisoning.target_metrics(ranks, valid, K, targets)
    hits, gains, pairs = 0, 0.0, 0
    for e in range(E):
      if test_items[e] == 0:
        continue
      taken = set(hist[e]) | {int(valid_items[e])}
      s = scores[e + 1]
      for j in targets:
        if j in taken:
          continue
        rank = sum(1 for c in range(1, NI + 1)
                   if c not in taken and s[c] >= s[j])
        assert ranks[targets.index(j), e] == rank
        pairs += 1
        if rank <= K:
          hits += 1
          gains += 1.0 / math.log2(1 + rank)
    assert not valid[1, 1] and not valid[2, 2] and not valid[:, 4].any()
    assert got["pairs"] == pairs == int(valid.sum())
    assert 0 < hits < pairs
    assert got[f"t_hr@{K}"] == pytest.approx(hits / pairs, rel=1e-12)
    assert got[f"t_ndcg@{K}"] == pytest.approx(gains / pairs, rel=1e-12)
    assert sum(v["pairs"] for v in got["per_target"].values()) == pairs


# --- The runner, end to end --------------------------------------------------


@pytest.fixture(scope="module")
def runner_out(tmp_path_factory):
  from conftest import tiny_config
  # GRU4Rec compiles faster than SASRec; cas + pamacf is the one real train
  # step of adv.magnitude=pamacf in the tests.
  config = tiny_config(**{"train.epochs": 2, "adv.epochs": 1,
                          "model.name": "gru4rec",
                          "data.poison.num_targets": 3})
  workdir = str(tmp_path_factory.mktemp("poison"))
  summary = runner.run(config, workdir, [0], ["random"], [0.05],
                       ["none", "cas+pamacf"], {"cas": 0.5}, clean=False)
  md = runner.write(workdir, summary)
  return config, workdir, summary, md


def test_runner_end_to_end(runner_out):
  config, workdir, summary, md = runner_out
  s = summary["settings"]["random_0.05"]
  assert (s["attack"], s["share"], s["fake_users"]) == ("random", 0.05, 20)
  assert set(s["rows"]) == {"none", "cas_pamacf"}
  assert summary["magnitude"] == {"none": "uniform",
                                  "cas_pamacf": "pamacf"}
  assert summary["eps"]["cas_pamacf"] == 0.5
  assert len(summary["targets"]) == 3
  for row in s["rows"].values():
    for metric in ("test/ndcg@10", "test/hr@10", "t_hr@50", "t_ndcg@50"):
      assert 0.0 <= row[metric]["mean"] <= 1.0 and row[metric]["std"] == 0.0
  # The phase-2 runs: their config, the clean metrics of results.json.
  run_dir = os.path.join(workdir, "random_0.05", "seed0", "cas_pamacf")
  with open(os.path.join(run_dir, "config.json")) as f:
    saved = json.load(f)
  assert saved["adv"]["method"] == "cas"
  assert saved["adv"]["magnitude"] == "pamacf"
  assert saved["data"]["poison"]["attack"] == "random"
  with open(os.path.join(run_dir, "results.json")) as f:
    res = json.load(f)
  assert res["data"]["fake_users"] == 20
  assert s["rows"]["cas_pamacf"]["test/ndcg@10"]["values"] == [
      res["cas"]["test/ndcg@10"]]
  # cas + pamacf trained both levels (the jitted train step).
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    lines = [x for x in map(json.loads, f)
             if x["phase"] == "cas" and "train/adv1" in x]
  assert lines and all(x["train/adv1"] > 0 and x["train/adv2"] > 0 and
                       math.isfinite(x["train/loss"]) for x in lines)
  # Outputs.
  with open(os.path.join(workdir, "poisoning.json")) as f:
    assert json.load(f)["settings"]["random_0.05"]["fake_users"] == 20
  assert "T-HR@50" in md and "cas_pamacf (eps 0.5)" in md
  assert os.path.exists(os.path.join(workdir, "poisoning.md"))
  # The target metrics equal a direct evaluation of the selected model.
  cfg = runner.common.apply_overrides(config, {
      "data.poison.attack": "random", "data.poison.share": 0.05})
  model, params, dd, n_items = train.load_selected(cfg, run_dir, "cas")
  direct = poisoning.evaluate_targets(model, params, dd, n_items,
                                      summary["targets"],
                                      cfg.eval.batch_size)
  assert s["rows"]["cas_pamacf"]["t_hr@50"]["values"] == [
      direct["t_hr@50"]]


def test_runner_reads_finished_runs_back(runner_out, monkeypatch):
  """A second run reads the target metrics back (targets.json) instead of
  evaluating again. (Training is read back by `common.run_variants`, tested
  with the other runners; stubbed here to keep this test fast.)"""
  config, workdir, summary, _ = runner_out
  trained = {v: {0: {k: row[k]["values"][0] for k in runner.common.METRICS}}
             for v, row in summary["settings"]["random_0.05"]["rows"].items()}
  monkeypatch.setattr(runner.common, "run_variants",
                      lambda *a, **k: trained)

  def no_eval(*a, **k):
    raise AssertionError("target metrics computed again")

  monkeypatch.setattr(poisoning, "evaluate_targets", no_eval)
  again = runner.run(config, workdir, [0], ["random"], [0.05],
                     ["none", "cas_pamacf"], {"cas": 0.5}, clean=False)
  assert again == summary
  # Another K is computed again.
  with pytest.raises(AssertionError, match="computed again"):
    runner.run(config, workdir, [0], ["random"], [0.05], ["none"],
               clean=False, k=20)


def test_variant_names_and_bad_arguments(make_config):
  assert runner.parse_variant("cas") == ("cas", "uniform")
  assert runner.parse_variant("cas_pamacf") == ("cas", "pamacf")
  assert runner.parse_variant("cas_temporal+pamacf") == ("cas_temporal",
                                                         "pamacf")
  v = runner.make_variants(make_config(), ["none", "cas", "cas+pamacf"],
                           {"cas": 0.1, "cas_pamacf": 0.3})
  assert v == {"none": {"adv.method": "none", "adv.magnitude": "uniform",
                        "adv.eps": 10.0},
               "cas": {"adv.method": "cas", "adv.magnitude": "uniform",
                       "adv.eps": 0.1},
               "cas_pamacf": {"adv.method": "cas", "adv.magnitude": "pamacf",
                              "adv.eps": 0.3}}
  assert runner.make_variants(make_config(), ["cas_pamacf"], {"cas": 0.2})[
      "cas_pamacf"]["adv.eps"] == 0.2
  assert runner.attack_dir("bandwagon", 0.03) == "bandwagon_0.03"
  assert runner.attack_dir("none", 0.01) == "clean"
  with pytest.raises(ValueError, match="Unknown variant 'fgsm_pamacf'"):
    runner.parse_variant("fgsm_pamacf")
  with pytest.raises(ValueError, match="not run"):
    runner.make_variants(make_config(), ["cas"], {"global": 0.1})
  with pytest.raises(ValueError, match="Unknown attack 'none'"):
    runner.run(make_config(), "/nonexistent", [0], ["none"], [0.01], ["cas"])
