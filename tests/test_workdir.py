"""The workdir contract (cat_jax/workdir.py): refusals, retrain, resume."""

import json

import pytest

from cat_jax import checkpoints, data, train
from conftest import tree_digest


BASE = {"train.epochs": 2, "adv.epochs": 1, "adv.eps": 0.5,
        "adv.method": "linear"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One finished two-phase run, copied by the tests that change it."""
  from conftest import tiny_config
  root = tmp_path_factory.mktemp("workdir") / "run"
  train.train_and_evaluate(tiny_config(**BASE), str(root))
  return root


def copy_of(trained, tmp_path):
  import shutil
  dst = tmp_path / "run"
  shutil.copytree(trained, dst)
  return dst


def test_changed_eps_is_refused_and_changes_nothing(make_config, trained,
                                                    tmp_path):
  w = copy_of(trained, tmp_path)
  before = tree_digest(w)
  with pytest.raises(checkpoints.WorkdirMismatch) as e:
    train.train_and_evaluate(make_config(**{**BASE, "adv.eps": 0.1}), str(w))
  msg = str(e.value)
  assert "adv.eps: 0.5 -> 0.1" in msg and "\n" not in msg
  assert "another --workdir" in msg and "--retrain" in msg
  assert tree_digest(w) == before  # byte-identical, config.json included


def test_a_changed_model_is_refused_for_phase_1(make_config, trained,
                                                 tmp_path):
  w = copy_of(trained, tmp_path)
  before = tree_digest(w)
  with pytest.raises(checkpoints.WorkdirMismatch,
                     match=r"model.hidden: 16 -> 8"):
    train.train_and_evaluate(make_config(**{**BASE, "model.hidden": 8}),
                             str(w))
  assert tree_digest(w) == before


def test_extending_phase_1_under_a_phase_2_is_refused_or_retrains(
    make_config, trained, tmp_path):
  w = copy_of(trained, tmp_path)
  before = tree_digest(w)
  longer = make_config(**{**BASE, "train.epochs": 3})
  with pytest.raises(checkpoints.WorkdirMismatch,
                     match=r"'linear'.*phase-1 epoch 2.*train.epochs=3"):
    train.train_and_evaluate(longer, str(w))
  assert tree_digest(w) == before
  old = json.load(open(w / "results.json"))["linear"]
  r = train.train_and_evaluate(longer, str(w), retrain=True)
  # Phase 1 was extended to 3 epochs and phase 2 retrained from it.
  assert r["pretrain"]["last_epoch"] == 3
  sig = json.load(open(w / "linear" / "signature.json"))
  assert sig["start_epoch"] == 3
  lines = [json.loads(l) for l in open(w / "metrics.jsonl")]
  adv = [l for l in lines if l["phase"] == "linear" and "valid/ndcg@10" in l]
  steps = lines[0]["step"] // lines[0]["epoch"]
  assert adv[-1]["step"] == 4 * steps  # 3 phase-1 epochs + 1
  assert r["linear"]["test/ndcg@10"] != old["test/ndcg@10"]


def test_extending_the_last_phase_is_allowed(make_config, trained, tmp_path):
  import time
  w = copy_of(trained, tmp_path)
  before = json.load(open(w / "linear" / "best.json"))["train_s"]
  assert before > 0
  t0 = time.time()
  r = train.train_and_evaluate(make_config(**{**BASE, "adv.epochs": 2}),
                               str(w))
  took = time.time() - t0
  assert r["linear"]["last_epoch"] == 2
  # The training time adds up over the processes that trained the phase:
  # the first one's (in best.json) plus at most this call's.
  after = json.load(open(w / "linear" / "best.json"))["train_s"]
  assert before < after <= r["linear"]["train_s"] <= before + took
  # Shrinking it is not.
  with pytest.raises(checkpoints.WorkdirMismatch, match="adv.epochs=1"):
    train.train_and_evaluate(make_config(**BASE), str(w))


def test_a_failed_run_writes_nothing(make_config, tmp_path):
  w = tmp_path / "new"
  bad = make_config(**{"data.name": "file", "data.path": "/nonexistent.txt"})
  with pytest.raises(data.DataError, match="Data file not found"):
    train.train_and_evaluate(bad, str(w))
  assert not w.exists()


def test_few_users_warn_with_the_count(make_config, tmp_path, caplog,
                                      monkeypatch):
  path = tmp_path / "few.txt"
  lines = [" ".join(str(x) for x in [u] + [1 + (u + i) % 9 for i in range(6)])
           for u in range(12)]
  path.write_text("\n".join(lines) + "\n")
  config = make_config(**{"data.name": "file", "data.path": str(path),
                          "train.epochs": 1, "train.batch_size": 8,
                          "eval.batch_size": 8})

  class Started(Exception):
    pass

  def stop(name, *args, **kwargs):
    raise Started(name)

  # The warning comes before training, which stops at its first phase:
  # 12 users' programs would compile for ~20 s and check nothing here.
  monkeypatch.setattr(train, "run_phase", stop)
  with caplog.at_level("WARNING"), pytest.raises(Started, match="pretrain"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert any("only 12 users have a validation and a test item" in r.message
             for r in caplog.records)


def test_none_ignores_perturbation_knobs(make_config, tmp_path):
  """`none` trains phase 1's loss on: a changed eps (e.g. another default)
  must not refuse its workdir, also one written before this rule."""
  sig = lambda **kw: checkpoints.phase_signature(
      make_config(**{"adv.method": "none", **kw}), "none")
  assert sig(**{"adv.eps": 10.0}) == sig(**{"adv.eps": 0.1, "adv.xi": 1.0})
  assert sig() != sig(**{"adv.init": "best"})
  cfg = {"train.epochs": 2, "adv.epochs": 1, "adv.method": "none"}
  first = train.train_and_evaluate(make_config(**cfg, **{"adv.eps": 10.0}),
                                   str(tmp_path))
  # As written before: the full adv section in signature.json.
  path = tmp_path / "none" / "signature.json"
  old = json.load(open(path))
  old["adv"] = {**old["adv"], "eps": 10.0, "lambda1": 1.0}
  json.dump(old, open(path, "w"))
  ckpt = tree_digest(tmp_path / "none" / "latest")
  again = train.train_and_evaluate(make_config(**cfg, **{"adv.eps": 0.1}),
                                   str(tmp_path))
  assert again["none"] == first["none"]
  assert tree_digest(tmp_path / "none" / "latest") == ckpt
