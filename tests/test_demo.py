"""The demo (configs/default.py), shrunk: several phase-2 methods from one
phase 1 in one workdir, the summary against `none`, and the programs they
share (issues 29 and 33)."""

import os

import jax
import pytest

from cat_jax import compilation, config_lib, programs, report, train
from cat_jax.experiments import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shrunk_demo(**overrides):
  """configs/default.py with the data, model and epochs cut to seconds.

  The shapes are tiny_config's (users, items, clusters, mean length; the
  demo's weak sequential signal stays): its programs are then those of the
  tiny runs of other tests, which the compilation cache compiles once."""
  c = config_lib.load_config_file(os.path.join(ROOT, "configs", "default.py"))
  return common.apply_overrides(c, {
      "data.synthetic.num_users": 400, "data.synthetic.num_items": 120,
      "data.synthetic.num_clusters": 6, "data.synthetic.mean_length": 12.0,
      "data.max_len": 12,
      "model.hidden": 16, "model.num_blocks": 1, "train.epochs": 4,
      "train.patience": 0, "adv.epochs": 2, "train.batch_size": 64,
      "eval.batch_size": 96, "parallel.devices": 1, **overrides})


def test_the_demo_is_the_fair_comparison():
  """What a newcomer runs: phase 1 until validation stops improving, then
  the base trained on as long (`none`) next to global and cas, at the eps
  chosen on validation."""
  c = config_lib.load_config_file(os.path.join(ROOT, "configs", "default.py"))
  assert train.phase2_methods(c) == ["none", "global", "cas"]
  assert c.train.patience > 0 and c.adv.init == "best"
  assert c.adv.eps == 0.3 and c.data.name == "synthetic"
  assert train.phase2_methods(config_lib.load_config_file(
      os.path.join(ROOT, "configs", "default.py") + ":method=none+cas")) == [
          "none", "cas"]


def test_several_methods_train_from_one_phase_1_as_if_alone(tmp_path):
  """`adv.method=none,global,cas` trains each from the one phase 1, with the
  results each gets alone, and the summary lists every phase against none;
  an eps sweep compiles nothing new: eps is a runtime input of the one
  program that global and the cascade methods share (issue 33)."""
  if not jax.config.jax_compilation_cache_dir:
    pytest.skip("needs the persistent compilation cache (conftest sets it)")
  both = train.train_and_evaluate(shrunk_demo(), str(tmp_path / "all"))
  assert set(both) >= {"pretrain", "none", "global", "cas"}
  assert len({both[m]["test/ndcg@10"] for m in ("none", "global", "cas")}) > 1
  text = report.run_summary({}, str(tmp_path / "all"), shrunk_demo())
  rows = {line.split()[0]: line for line in text.splitlines()[2:6]}
  assert list(rows) == ["pretrain", "none", "global", "cas"]
  assert "vs none" in text and "fewer epochs" not in text
  assert rows["global"].endswith("%") and rows["cas"].endswith("%")
  with compilation.CompileCounter() as alone_count:
    alone = train.train_and_evaluate(shrunk_demo(**{"adv.method": "cas"}),
                                     str(tmp_path / "c"))
  for key in ("test/ndcg@10", "test/hr@10", "valid/ndcg@10"):
    assert alone["cas"][key] == both["cas"][key]
    assert alone["pretrain"][key] == both["pretrain"][key]
  # The same setup in this process: its programs are reused as they are
  # (`programs`), nothing is traced, loaded or compiled.
  assert alone_count.requests == 0
  # Without them, everything comes from the persistent cache, and a new eps
  # compiles nothing either.
  programs.clear()
  with compilation.CompileCounter() as count:
    r = train.train_and_evaluate(
        shrunk_demo(**{"adv.eps": 0.1, "adv.method": "cas",
                       "train.pretrain_dir": str(tmp_path / "all")}),
        str(tmp_path / "eps0.1"))
  assert count.requests > 0
  assert count.compiled == 0, f"a new eps compiled {count.compiled}"
  assert r["cas"]["valid/ndcg@10"] != both["cas"]["valid/ndcg@10"]


def test_a_program_compiled_ahead_is_the_one_that_runs(make_config):
  """`epoch.Ahead` compiles phase 2's epoch on a thread while phase 1
  trains; calling it runs that executable (the jitted program never
  compiles) and gives the jitted program's results, bit for bit."""
  import jax.numpy as jnp
  import numpy as np
  from cat_jax import adversarial, batching, data, epoch, models, sharding
  config = make_config()
  arrays = data.build_arrays(data.load_from_config(config.data), 12)
  # On a run's one-device mesh: the program of the tiny cas runs of other
  # tests (compiled once by the compilation cache).
  mesh = sharding.make_mesh(1)
  dd = sharding.replicate(train.device_data(arrays), mesh)
  model = models.build_model(config.model, arrays.num_items, 12)
  opt = train.make_optimizer(config.train)
  plan = batching.plan_from_table(arrays.train_inputs, arrays.train_users, 64)
  cfg = adversarial.method_config("cas", eps=0.3)
  make = lambda: epoch.make_train_epoch(
      adversarial.make_objective(model, cfg), opt, arrays.num_items, plan,
      mesh, hparams=cfg.hyperparams())[0]
  pert = (dd["train_inputs"] > 0).astype(jnp.float32)
  keys = (jax.random.PRNGKey(1), jax.random.PRNGKey(2))
  state = lambda: sharding.replicate(
      train.init_state(model, opt, jax.random.PRNGKey(0), 12), mesh)
  jitted = make()
  ahead_epoch, _ = epoch.make_train_epoch(
      adversarial.make_objective(model, cfg), opt, arrays.num_items, plan,
      mesh, hparams=cfg.hyperparams(),
      program=make().ahead(state(), dd, pert, *keys))
  got, _ = ahead_epoch(state(), dd, pert, *keys)
  assert ahead_epoch.program._cache_size() == 1
  assert ahead_epoch.program.program._cache_size() == 0  # never jit-compiled
  want, _ = jitted(state(), dd, pert, *keys)
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
